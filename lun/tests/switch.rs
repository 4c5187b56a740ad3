//! SwitchLun: a layer replaced under a LUN in use. A request in flight finishes on the old
//! layer before the switch step runs, and every later one goes to the new layer.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use lun::fault::FaultLun;
use lun::{FileLun, Lun, SwitchError, SwitchLun};

const S: usize = 512;

fn file(dir: &tempfile::TempDir, name: &str, sectors: u64) -> Arc<dyn Lun> {
    Arc::new(FileLun::create(&dir.path().join(name), sectors * S as u64).unwrap())
}

#[test]
fn requests_in_flight_finish_on_the_old_layer_and_later_ones_reach_the_new() {
    let dir = tempfile::tempdir().unwrap();
    let old = Arc::new(FaultLun::new(file(&dir, "old", 8)));
    old.set_latency(Duration::from_millis(300));
    let new = file(&dir, "new", 8);
    let switch = Arc::new(SwitchLun::new(old.clone()));

    let (started, wait_started) = mpsc::channel();
    let writer = {
        let switch = switch.clone();
        thread::spawn(move || {
            started.send(()).unwrap();
            switch.write_at(&[1u8; S], 0).unwrap();
        })
    };
    wait_started.recv().unwrap();
    thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let mut writes_when_switched = None;
    switch
        .switch(|below| {
            writes_when_switched = Some(old.writes());
            assert_eq!(below.name(), old.name());
            Ok::<_, std::io::Error>(new.clone())
        })
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "the switch did not wait for the write in flight"
    );
    assert_eq!(writes_when_switched, Some(1));
    writer.join().unwrap();

    switch.write_at(&[2u8; S], S as u64).unwrap();
    let mut buf = [0u8; S];
    new.read_at(&mut buf, S as u64).unwrap();
    assert_eq!(buf, [2u8; S]);
    old.read_at(&mut buf, S as u64).unwrap();
    assert_eq!(
        buf, [0u8; S],
        "a write after the switch reached the old layer"
    );
    old.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [1u8; S]);
}

#[test]
fn a_layer_of_another_shape_or_a_failed_step_keeps_the_current_one() {
    let dir = tempfile::tempdir().unwrap();
    let old = file(&dir, "old", 8);
    let switch = SwitchLun::new(old.clone());
    let bigger = file(&dir, "bigger", 16);
    let err = switch
        .switch(|_| Ok::<_, std::io::Error>(bigger))
        .unwrap_err();
    assert!(matches!(err, SwitchError::Shape { .. }), "{err}");
    assert!(err.to_string().contains("8192 bytes"), "{err}");
    let err = switch
        .switch(|_| Err::<Arc<dyn Lun>, _>(std::io::Error::other("pool full")))
        .unwrap_err();
    assert!(matches!(err, SwitchError::Step(_)));
    switch.write_at(&[3u8; S], 0).unwrap();
    let mut buf = [0u8; S];
    old.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [3u8; S]);
    assert_eq!(switch.below().name(), old.name());
}
