//! The whole relay as operators run it: turn-control and xdp-agent together
//! in the lab, driven by TURN clients we did not write (coturn's
//! `turnutils_uclient` with `turnutils_peer`). Channel data must be relayed
//! by XDP: the agent's relayed bytes grow while turn-control's user-space
//! bytes stay flat, and no message is lost to the offload handshake.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::time::Duration;

use tests::agent::Agent;
use tests::{AGENT_METRICS, Lab, Site, TURN_CONTROL_METRICS, sample, sample_sum, wait_for};
use tests_harness::coturn::{Totals, tools_present};

struct Case {
    name: &'static str,
    server: &'static str,
    peer: &'static str,
    /// uclient's relay-family flag.
    family_flag: Option<&'static str>,
    to_peer: &'static str,
    to_client: &'static str,
}

fn run_case(case: &Case) {
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&["--xdp-mode", "native", "--metrics", AGENT_METRICS])
        .unwrap();
    lab.start_turn_control(Some(&socket), &[]).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();

    let mut peer = lab.peer.command("turnutils_peer");
    peer.args(["-L", case.peer, "-p", "3480"]);
    lab.spawn("turnutils_peer", peer).unwrap();

    let (clients, messages) = (5u64, 200u64);
    let mut uclient = lab.uclient(case.peer);
    uclient.args([
        "-m",
        &clients.to_string(),
        "-n",
        &messages.to_string(),
        "-l",
        "100",
        "-z",
        "5",
        "-c",
    ]);
    if let Some(flag) = case.family_flag {
        uclient.arg(flag);
    }
    uclient.args(["-p", "3478", case.server]);
    let output = uclient.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let Totals { sent, received } = Totals::parse(&stdout).unwrap_or_else(|| {
        panic!(
            "{}: no totals from uclient:\n{stdout}\n{}",
            case.name,
            lab.log("turn-control")
        )
    });
    assert_eq!(sent, clients * messages, "{}", case.name);
    let mut agent = Agent::connect(&socket).unwrap();
    let (to_peer, _) = agent.counter(case.to_peer).unwrap();
    let (to_client, _) = agent.counter(case.to_client).unwrap();
    // The relay's counts say on which side of it a loss happened.
    assert!(
        received * 100 >= sent * 99,
        "{}: {received} of {sent} echoed; XDP relayed {to_peer} to the peer \
         and {to_client} back",
        case.name
    );
    assert!(
        to_peer >= sent,
        "{}: XDP relayed {to_peer} of {sent} to the peer",
        case.name
    );
    assert!(
        to_client >= received,
        "{}: XDP relayed {to_client} of {received} back",
        case.name
    );

    let control = Lab::scrape(&lab.relay, TURN_CONTROL_METRICS).unwrap();
    let userspace = sample_sum(&control, "data_relayed_userspace_packets_total");
    assert_eq!(
        userspace, 0.0,
        "{}: channel data crossed user space",
        case.name
    );
    // Every channel bind was acknowledged by the agent: none fell back.
    let installed = sample(
        &control,
        "turn_offload_installs_total",
        "result=\"installed\"",
    );
    assert!(
        installed.unwrap_or(0.0) >= clients as f64,
        "{}: {installed:?} offloads",
        case.name
    );
    // None failed. One may have timed out (its success sent after 50 ms on a loaded
    // machine) and still be installed, counted above.
    let failed = sample(&control, "turn_offload_installs_total", "result=\"failed\"");
    assert_eq!(failed.unwrap_or(0.0), 0.0, "{}: failed offloads", case.name);
    // The agent refreshes its metrics every second: wait for this traffic.
    let agent_metrics = wait_for("the agent's relayed bytes", Duration::from_secs(10), || {
        let body = Lab::scrape(&lab.relay, AGENT_METRICS)?;
        let relayed = sample(&body, "data_relayed_ebpf_bytes_total", "").unwrap_or(0.0);
        Ok((relayed >= (sent * 100) as f64).then_some(body))
    })
    .unwrap();
    tests::promtool_check_metrics(&control).unwrap();
    tests::promtool_check_metrics(&agent_metrics).unwrap();
}

#[test]
fn uclient_channel_data_is_relayed_by_xdp_in_every_family_pair() {
    if !tests::privileged()
        || !tools_present("uclient_channel_data_is_relayed_by_xdp_in_every_family_pair")
    {
        return;
    }
    let cases = [
        Case {
            name: "v4",
            server: "203.0.113.10",
            peer: "198.51.100.2",
            family_flag: None,
            to_peer: "relay_client_to_peer_v4_v4",
            to_client: "relay_peer_to_client_v4_v4",
        },
        Case {
            name: "v6",
            server: "2001:db8:2::a",
            peer: "2001:db8:3::2",
            family_flag: Some("-x"),
            to_peer: "relay_client_to_peer_v6_v6",
            to_client: "relay_peer_to_client_v6_v6",
        },
        Case {
            name: "v4 client, v6 peer",
            server: "203.0.113.10",
            peer: "2001:db8:3::2",
            family_flag: Some("-x"),
            to_peer: "relay_client_to_peer_v4_v6",
            to_client: "relay_peer_to_client_v6_v4",
        },
        Case {
            name: "v6 client, v4 peer",
            server: "2001:db8:2::a",
            peer: "198.51.100.2",
            family_flag: Some("-X"),
            to_peer: "relay_client_to_peer_v6_v4",
            to_client: "relay_peer_to_client_v4_v6",
        },
    ];
    for case in &cases {
        run_case(case);
    }
}
