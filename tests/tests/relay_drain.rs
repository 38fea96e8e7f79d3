//! A relay taken out of service under traffic, with both daemons in the lab:
//! after a drain (POST /drain on turn-control's admin endpoint) an allocation
//! made before keeps relaying through the kernel, a new Allocate gets 300
//! (Try Alternate) naming the configured alternate, which the webrtc-rs
//! client and coturn's `turnutils_uclient` report, and turn-control exits 0 by
//! itself once the last allocation is gone, leaving the kernel's maps empty.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use tests::agent::Agent;
use tests::{AGENT_METRICS, CLIENT_V4, Lab, PEER_V4, Site, wait_for};
use tests_harness::coturn::tools_present;

const T: Duration = Duration::from_secs(5);
const ADMIN: &str = "127.0.0.1:9643";
const ALTERNATE: &str = "203.0.113.99:3478";

/// `method path` to turn-control's admin endpoint in the relay namespace:
/// status code and body.
fn admin(lab: &Lab, method: &str, path: &str) -> (u16, String) {
    let mut stream = lab.relay.enter(|| Ok(TcpStream::connect(ADMIN)?)).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

fn relayed_to_peer(agent: &mut Agent) -> u64 {
    agent.counter("relay_client_to_peer_v4_v4").unwrap().0
}

#[test]
fn a_drained_relay_keeps_its_calls_in_the_kernel_redirects_new_ones_and_exits_when_empty() {
    if !tests::privileged() || !tools_present("relay_drain") {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])
        .unwrap();
    lab.start_turn_control(
        Some(&socket),
        &["--admin", ADMIN, "--alternate-server", ALTERNATE],
    )
    .unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    let runtime = tests::clients::runtime().unwrap();
    let _guard = runtime.enter();
    let mut agent = Agent::connect(&socket).unwrap();
    let server = SocketAddr::new(IpAddr::V4(Site::A.v4()), 3478);
    let peer = tests::clients::udp_socket(&lab.peer, IpAddr::V4(PEER_V4)).unwrap();

    let before_drain = runtime
        .block_on(tests::clients::webrtc_client(
            &lab.client,
            IpAddr::V4(CLIENT_V4),
            server,
        ))
        .unwrap();
    let relayed = runtime.block_on(before_drain.allocate()).unwrap();
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 10, T))
        .unwrap();
    assert_eq!(admin(&lab, "GET", "/readyz").0, 200);

    let (code, body) = admin(&lab, "POST", "/drain");
    assert_eq!(
        (code, body.trim_end()),
        (202, r#"{"draining":true,"allocations":1}"#)
    );
    assert_eq!(
        admin(&lab, "GET", "/readyz").0,
        503,
        "draining is not ready"
    );
    assert_eq!(admin(&lab, "GET", "/healthz").0, 200, "draining is alive");

    // The call made before the drain goes on, in the kernel (its channel there: the
    // ChannelBind success goes out after 50 ms without the agent's answer on a loaded host).
    wait_for("the channel in the kernel", T, || {
        Ok((agent.list()?.len() == 1).then_some(()))
    })
    .unwrap();
    let kernel = relayed_to_peer(&mut agent);
    runtime
        .block_on(tests::clients::round_trips(&relayed, &peer, 20, T))
        .unwrap();
    assert!(
        relayed_to_peer(&mut agent) >= kernel + 20,
        "relayed by XDP while draining"
    );

    // A new one is sent elsewhere.
    let after_drain = runtime
        .block_on(tests::clients::webrtc_client(
            &lab.client,
            IpAddr::V4(CLIENT_V4),
            server,
        ))
        .unwrap();
    let refused = runtime.block_on(after_drain.allocate());
    let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("300"), "webrtc-rs allocate: {error:?}");
    // Bounded: a client that does not follow the redirect may retry on its own.
    let output = lab
        .client
        .command("timeout")
        .args(["10", "turnutils_uclient", "-u", "test", "-w", "testpass"])
        .args([
            "-y",
            "-n",
            "1",
            "-m",
            "1",
            "-p",
            "3478",
            &Site::A.v4().to_string(),
        ])
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains("300"),
        "turnutils_uclient against a draining relay: {printed}"
    );

    // The last allocation goes: turn-control exits 0 by itself, the kernel's
    // maps are empty.
    runtime
        .block_on(webrtc_util::Conn::close(&relayed))
        .unwrap();
    wait_for("turn-control to exit by itself", T * 2, || {
        match lab.process_mut("turn-control")?.ensure_running() {
            Ok(()) => Ok(None),
            Err(exited) => Ok(Some(exited.to_string())),
        }
    })
    .map(|exited| assert!(exited.contains("exit status: 0"), "{exited}"))
    .unwrap();
    assert!(
        agent.list().unwrap().is_empty(),
        "nothing left in the kernel"
    );
    let _ = runtime.block_on(before_drain.close());
    let _ = runtime.block_on(after_drain.close());
}
