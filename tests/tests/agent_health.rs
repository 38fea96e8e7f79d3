//! The agent's `--health` endpoint as a Kubernetes probe sees it: liveness,
//! readiness that follows the kernel (the program detached behind the agent's
//! back), and what it refuses.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tests::{AGENT_METRICS, Lab, RELAY_IFACE, sample, wait_for};

const HEALTH: &str = "127.0.0.1:9644";
const DEADLINE: Duration = Duration::from_secs(5);

/// Sends `request` to the health endpoint inside the relay's namespace; the
/// status code and the body.
fn ask(lab: &Lab, request: &str) -> (u16, String) {
    let request = request.to_owned();
    lab.relay
        .enter(move || {
            let mut stream = TcpStream::connect(HEALTH)?;
            stream.set_read_timeout(Some(DEADLINE))?;
            stream.write_all(request.as_bytes())?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            let status = head
                .strip_prefix("HTTP/1.1 ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP/1.1 response: {response:?}"));
            Ok((status, body.to_owned()))
        })
        .unwrap()
}

fn get(lab: &Lab, path: &str) -> (u16, String) {
    ask(lab, &format!("GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n"))
}

fn ready_gauge(lab: &Lab) -> Option<f64> {
    let body = Lab::scrape(&lab.relay, AGENT_METRICS).ok()?;
    sample(&body, "xdp_agent_ready", "")
}

#[test]
fn readiness_follows_the_kernel_and_liveness_holds() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.start_xdp_agent(&["--health", HEALTH, "--metrics", AGENT_METRICS])
        .unwrap();
    assert_eq!(get(&lab, "/healthz"), (200, "ok".to_owned()));
    assert_eq!(get(&lab, "/readyz"), (200, "ok".to_owned()));
    wait_for("xdp_agent_ready 1", DEADLINE, || {
        Ok((ready_gauge(&lab) == Some(1.0)).then_some(()))
    })
    .unwrap();

    // Behind the agent's back: BPF_LINK_DETACH on its pinned link takes the
    // program off the interface (`ip link set dev x0 xdp off` is refused
    // while a link holds it). The agent still holds the link's descriptor.
    let pin = lab.pin_dir().join(format!("link-{RELAY_IFACE}"));
    let detach = ["link", "detach", "pinned"].map(OsStr::new);
    tests::run("bpftool", detach.iter().copied().chain([pin.as_os_str()])).unwrap();

    let (status, reason) = get(&lab, "/readyz");
    assert_eq!(status, 503, "{reason}");
    assert!(reason.contains(RELAY_IFACE), "{reason}");
    assert!(reason.contains("not attached"), "{reason}");
    assert!(!reason.contains('\n'), "{reason:?}");
    assert_eq!(get(&lab, "/healthz"), (200, "ok".to_owned()));
    wait_for("xdp_agent_ready 0", DEADLINE, || {
        Ok((ready_gauge(&lab) == Some(0.0)).then_some(()))
    })
    .unwrap();
}

#[test]
fn other_paths_methods_and_oversized_requests_are_refused() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    lab.start_xdp_agent(&["--health", HEALTH]).unwrap();
    assert_eq!(get(&lab, "/metrics").0, 404);
    assert_eq!(get(&lab, "/").0, 404);
    assert_eq!(
        ask(&lab, "POST /readyz HTTP/1.1\r\nContent-Length: 0\r\n\r\n").0,
        405
    );
    assert_eq!(ask(&lab, "hello\r\n\r\n").0, 400);

    // Closed unanswered: a head beyond a few KiB.
    let oversized = format!(
        "GET /healthz HTTP/1.1\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(8192)
    );
    let answer = lab
        .relay
        .enter(move || {
            let mut stream = TcpStream::connect(HEALTH)?;
            stream.set_read_timeout(Some(DEADLINE))?;
            // The agent may close before reading it all: a reset is an answer too.
            let _ = stream.write_all(oversized.as_bytes());
            let mut response = Vec::new();
            let _ = stream.read_to_end(&mut response);
            Ok(response)
        })
        .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    // And the endpoint still serves.
    assert_eq!(get(&lab, "/healthz").0, 200);
}

#[test]
fn a_busy_health_port_fails_the_start_in_one_line() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let _holder = lab
        .relay
        .enter(|| Ok(std::net::TcpListener::bind(HEALTH)?))
        .unwrap();
    let error = lab.start_xdp_agent(&["--health", HEALTH]).unwrap_err();
    let error = format!("{error:#}");
    assert!(
        error.contains("cannot serve health checks on 127.0.0.1:9644"),
        "{error}"
    );
}
