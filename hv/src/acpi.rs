//! ACPI tables: the guest finds its CPUs (MADT), how to power off and reset (FADT, hardware
//! reduced: no PM timer, no GPEs, just sleep and reset registers), its devices and the power
//! button behind the Generic Event Device (DSDT).
//! Distribution kernels build virtio_mmio without command-line device support, so the DSDT is
//! the only place they learn about our virtio-mmio disks.

use acpi_tables::Aml;
use acpi_tables::aml::{
    And, Device, EISAName, Equal, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, IO, If, Interrupt, Local, Memory32Fixed, Method, Name, Notify, OpRegion,
    OpRegionSpace, Package, Path, ResourceTemplate, Scope, Store,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use crate::devices::ged::EVENT_POWER_BUTTON;
use crate::host::MAX_APIC_VCPUS;
use crate::layout::{
    ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_S5_SLP_TYP, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_START, COM1_GSI, COM1_PORT, GED_ADDR, GED_GSI, IOAPIC_ADDR,
    LAPIC_ADDR, VIRTIO_MMIO_SIZE,
};

const OEM_ID: [u8; 6] = *b"VAPP  ";
const OEM_TABLE_ID: [u8; 8] = *b"VAPPHV  ";
const OEM_REVISION: u32 = 1;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MmioDevice {
    pub base: u64,
    pub gsi: u32,
}

/// The tables, laid out from [`ACPI_START`]: each entry is (guest address, bytes). The RSDP
/// comes first, at `ACPI_START`.
pub(crate) struct Tables {
    pub rsdp_addr: u64,
    pub blobs: Vec<(u64, Vec<u8>)>,
}

/// Builds the tables for `vcpus` CPUs (APIC ids 0..vcpus) and the given virtio devices.
pub(crate) fn build(vcpus: u32, devices: &[MmioDevice]) -> Result<Tables, String> {
    let mut next = ACPI_START;
    let mut place = |len: usize| {
        let addr = next;
        next = (next + len as u64).next_multiple_of(16);
        addr
    };
    let rsdp_addr = place(Rsdp::len());
    let dsdt = dsdt(devices);
    let dsdt_addr = place(dsdt.len());
    let fadt = to_bytes(&fadt(dsdt_addr));
    let fadt_addr = place(fadt.len());
    let madt = to_bytes(&madt(vcpus)?);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = place(xsdt.len());
    let end = place(0);
    if end > ACPI_END {
        return Err(format!(
            "ACPI tables need {} bytes, more than the {} reserved",
            end - ACPI_START,
            ACPI_END - ACPI_START
        ));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(Tables {
        rsdp_addr,
        blobs: vec![
            (rsdp_addr, rsdp),
            (dsdt_addr, dsdt.as_slice().to_vec()),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (xsdt_addr, xsdt),
        ],
    })
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed-feature buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_register(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"VAPPHV  ").into();
    fadt.finalize()
}

fn madt(vcpus: u32) -> Result<MADT, String> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    if vcpus > MAX_APIC_VCPUS {
        return Err(format!(
            "{vcpus} vCPUs: xAPIC ids stop at {MAX_APIC_VCPUS} (255 is the broadcast id)"
        ));
    }
    for id in 0..vcpus as u8 {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    Ok(madt)
}

fn dsdt(devices: &[MmioDevice]) -> Sdt {
    // Name::new serialises its value at once; Device and Scope keep references.
    let com1_io = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_names = [
        Name::new("_HID".into(), &EISAName::new("PNP0501")),
        Name::new("_UID".into(), &0u8),
        Name::new(
            "_CRS".into(),
            &ResourceTemplate::new(vec![&com1_io, &com1_irq]),
        ),
    ];
    let com1 = Device::new(
        "COM1".into(),
        com1_names.iter().map(|n| n as &dyn Aml).collect(),
    );

    // Each virtio-mmio window with its edge-triggered interrupt, as Linux's virtio_mmio
    // platform driver matches them (LNRO0005).
    let virtio_names: Vec<[Name; 3]> = devices
        .iter()
        .enumerate()
        .map(|(uid, d)| {
            let window = Memory32Fixed::new(true, d.base as u32, VIRTIO_MMIO_SIZE as u32);
            let irq = Interrupt::new(true, true, false, false, d.gsi);
            [
                Name::new("_HID".into(), &"LNRO0005"),
                Name::new("_UID".into(), &(uid as u32)),
                Name::new("_CRS".into(), &ResourceTemplate::new(vec![&window, &irq])),
            ]
        })
        .collect();
    let virtio: Vec<Device> = virtio_names
        .iter()
        .enumerate()
        .map(|(i, names)| {
            Device::new(
                Path::new(&format!("V{i:03X}")),
                names.iter().map(|n| n as &dyn Aml).collect(),
            )
        })
        .collect();

    // The power button, notified by the GED's event method. The GED's _CRS may hold only
    // interrupts (Linux's evged refuses anything else), so its register is an OperationRegion.
    let power_button_names = [
        Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
        Name::new("_UID".into(), &0u8),
    ];
    let power_button = Device::new(
        "PWRB".into(),
        power_button_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    let ged_irq = Interrupt::new(true, true, false, false, GED_GSI);
    let ged_crs = ResourceTemplate::new(vec![&ged_irq]);
    let ged_hid = Name::new("_HID".into(), &"ACPI0013");
    let ged_uid = Name::new("_UID".into(), &0u8);
    let ged_crs = Name::new("_CRS".into(), &ged_crs);
    let ged_base = GED_ADDR as u32;
    let ged_region = OpRegion::new("GDST".into(), OpRegionSpace::SystemMemory, &ged_base, &4u8);
    let ged_field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let ged_register = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &ged_register);
    let power_bit = And::new(&Local(1), &Local(0), &EVENT_POWER_BUTTON);
    let power_button_path = Path::new("\\_SB_.PWRB");
    // 0x80: "status change", which the ACPI button driver reports as a press.
    let notify = Notify::new(&power_button_path, &0x80u8);
    let pressed = Equal::new(&Local(1), &EVENT_POWER_BUTTON);
    let if_pressed = If::new(&pressed, vec![&notify]);
    let ged_event = Method::new(
        "_EVT".into(),
        1,
        true,
        vec![&read_events, &power_bit, &if_pressed],
    );
    let ged = Device::new(
        "GED_".into(),
        vec![
            &ged_hid,
            &ged_uid,
            &ged_crs,
            &ged_region,
            &ged_field,
            &ged_event,
        ],
    );

    let mut children: Vec<&dyn Aml> = vec![&com1, &power_button, &ged];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    let system_bus = Scope::new("_SB_".into(), children);
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&ACPI_S5_SLP_TYP, &ACPI_S5_SLP_TYP, &0u8, &0u8]),
    );

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    system_bus.to_aml_bytes(&mut dsdt);
    s5.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_checksum_and_fit() {
        let devices: Vec<MmioDevice> = (0..crate::layout::MAX_DISKS)
            .map(|i| {
                let (base, gsi) = crate::layout::virtio_mmio_device(i);
                MmioDevice { base, gsi }
            })
            .collect();
        let tables = build(254, &devices).unwrap();
        assert_eq!(tables.rsdp_addr, ACPI_START);
        let (_, rsdp) = &tables.blobs[0];
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        for (addr, blob) in &tables.blobs[1..] {
            assert!(checksum_ok(blob), "table at {addr:#x}");
            let len = u32::from_le_bytes(blob[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, blob.len(), "length field of the table at {addr:#x}");
        }
        let dsdt = &tables.blobs[1].1;
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
        // The GED register window, as OperationRegion GDST (SystemMemory, DWord base) encodes it.
        let mut region = b"\x5b\x80GDST\x00\x0c".to_vec();
        region.extend_from_slice(&(GED_ADDR as u32).to_le_bytes());
        assert!(
            dsdt.windows(region.len()).any(|w| w == region),
            "GED region"
        );
    }

    #[test]
    fn madt_lists_one_lapic_per_vcpu() {
        let table = to_bytes(&madt(3).unwrap());
        let (mut offset, mut apic_ids) = (44, Vec::new());
        while offset < table.len() {
            let (kind, len) = (table[offset], usize::from(table[offset + 1]));
            if kind == 0 {
                apic_ids.push(table[offset + 3]);
            }
            offset += len;
        }
        assert_eq!(apic_ids, [0, 1, 2]);
        assert!(madt(254).is_ok());
        assert!(madt(255).is_err());
    }
}
