//! The agent's control API: HTTP + JSON on a Unix socket of mode 0600 in the runtime
//! directory, so only the agent's owner (and root) can drive it, as Docker's and
//! Firecracker's sockets do.
//!
//! - `GET /vms`: the VMs this agent runs or ran, with state, host and pid.
//! - `POST /vms/<folder>/start[?datastore=D]`: runs the VM at datastore folder `/<folder>`
//!   here, and answers once its runner holds the VM's lock. `POST /vms/<folder>/stop`:
//!   presses its power button and answers once it is off. `D` (percent-encoded) is the
//!   datastore's UUID or the path host.toml gives; without it, the only datastore of the
//!   agent's that holds the folder.
//! - `GET /events[?since=SEQ]`: what the agent did and saw, oldest first: the newest
//!   [`crate::EVENTS_KEPT`], or those numbered after `SEQ`.
//! - `GET /datastores`, `POST /datastores/<uuid>/files`: the command line's file commands
//!   ([`crate::files_api`]).
//!
//! Errors are `{"error": "..."}` with 400 (malformed request), 404 (no such endpoint),
//! 405 (wrong method) or 409 (the VM could not be started or stopped).

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tiny_http::{Header, Method, Request, Response, Server};

use crate::{Agent, Error, Result};

pub struct Serving {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Serving {
    pub fn shutdown(mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub fn serve(agent: Arc<Agent>) -> Result<Serving> {
    let path = agent.config().socket();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(crate::io(path.display().to_string())(e)),
    }
    let server = Server::http_unix(&path)
        .map_err(|e| Error::Api(format!("{}: cannot listen: {e}", path.display())))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(crate::io(path.display().to_string()))?;
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    let thread = std::thread::Builder::new()
        .name("host-api".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match server.recv_timeout(Duration::from_millis(100)) {
                    Ok(Some(request)) => {
                        let agent = agent.clone();
                        // A start waits for the guest; other requests must not wait behind it.
                        let _ = std::thread::Builder::new()
                            .name("host-api-request".into())
                            .spawn(move || handle(&agent, request));
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "host API: accepting a request failed"),
                }
            }
        })
        .map_err(crate::io("starting the API thread"))?;
    Ok(Serving {
        done,
        thread: Some(thread),
    })
}

fn handle(agent: &Agent, mut request: Request) {
    let (status, body) = match crate::files_api::route(agent, &mut request) {
        Some(answer) => answer,
        None => route(agent, request.method(), request.url()),
    };
    let header = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]);
    let mut response = Response::from_string(body.to_string()).with_status_code(status);
    if let Ok(header) = header {
        response = response.with_header(header);
    }
    if let Err(e) = request.respond(response) {
        tracing::debug!(error = %e, "host API: the client left before the answer");
    }
}

fn error(status: u16, message: String) -> (u16, serde_json::Value) {
    (status, serde_json::json!({ "error": message }))
}

/// The `datastore=` parameter of a query (percent-encoded), if there is one.
fn datastore_param(url: &str) -> Result<Option<String>, String> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(None);
    };
    let mut datastore = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "datastore" {
            return Err(format!("unknown parameter {key:?} (datastore)"));
        }
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("datastore={value}: not UTF-8"))?;
        datastore = Some(value.into_owned());
    }
    Ok(datastore)
}

/// The `since=` parameter of an events query, 0 without one.
fn since_param(url: &str) -> Result<u64, String> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(0);
    };
    let mut since = 0;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != "since" {
            return Err(format!("unknown parameter {key:?} (since)"));
        }
        since = value
            .parse()
            .map_err(|_| format!("since={value}: not an event number"))?;
    }
    Ok(since)
}

fn route(agent: &Agent, method: &Method, url: &str) -> (u16, serde_json::Value) {
    let path = url.split('?').next().unwrap_or(url);
    match path {
        "/vms" | "/events" => {
            if *method != Method::Get {
                return error(405, format!("{method} {path}: only GET"));
            }
            if path == "/vms" {
                (200, serde_json::json!(agent.report()))
            } else {
                match since_param(url) {
                    Ok(since) => (200, serde_json::json!(agent.events_since(since))),
                    Err(e) => error(400, format!("{method} {url}: {e}")),
                }
            }
        }
        _ => {
            let Some(rest) = path.strip_prefix("/vms/") else {
                return error(404, format!("{method} {path}: no such endpoint"));
            };
            let Some((folder, action)) = rest.rsplit_once('/') else {
                return error(
                    400,
                    format!("{method} {path}: expected /vms/<folder>/start or /vms/<folder>/stop"),
                );
            };
            let folder = format!("/{}", folder.trim_end_matches('/'));
            if folder == "/"
                || folder
                    .split('/')
                    .any(|p| p == ".." || p == "." || p.contains('%'))
            {
                return error(
                    400,
                    format!("{method} {path}: {folder:?} is not a VM folder"),
                );
            }
            if *method != Method::Post {
                return error(405, format!("{method} {path}: only POST"));
            }
            if !matches!(action, "start" | "stop") {
                return error(
                    400,
                    format!("{method} {path}: unknown action {action:?} (start or stop)"),
                );
            }
            let datastore = match datastore_param(url) {
                Ok(d) => d,
                Err(e) => return error(400, format!("{method} {url}: {e}")),
            };
            let store = match agent.store_for(&folder, datastore.as_deref()) {
                Ok(store) => store,
                Err(e) => return error(409, e.to_string()),
            };
            let (given, uuid) = agent.datastore(store);
            match action {
                "start" => match agent.start_vm(store, &folder) {
                    Ok(pid) => {
                        agent.vm_event(store, "vm-started", &folder, format!("pid {pid}"));
                        (
                            200,
                            serde_json::json!({
                                "vm": folder,
                                "pid": pid,
                                "host": agent.config().name,
                                "datastore": given,
                                "datastore_uuid": uuid,
                            }),
                        )
                    }
                    Err(e) => {
                        agent.vm_event(store, "vm-start-failed", &folder, e.to_string());
                        error(409, e.to_string())
                    }
                },
                _ => match agent.stop_vm(store, &folder, Duration::from_secs(60)) {
                    Ok(()) => (
                        200,
                        serde_json::json!({ "vm": folder, "state": "stopped", "datastore": given, "datastore_uuid": uuid }),
                    ),
                    Err(e) => error(409, e.to_string()),
                },
            }
        }
    }
}
