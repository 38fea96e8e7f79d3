//! coturn's own client, `turnutils_uclient`, in each of its modes against
//! turn-control and xdp-agent in the lab, over IPv4 and IPv6: the reference
//! client of the server we replace must work as it is, defaults included
//! (RTP/RTCP pairs through EVEN-PORT and RESERVATION-TOKEN), with every
//! message echoed; and `turnutils_stunclient` gets its reflexive address.
//! Each run's figures are printed as a table (`--nocapture`).
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::net::IpAddr;

use tests::agent::Agent;
use tests::{AGENT_METRICS, Lab, PEER_V4, PEER_V6, RELAY_V4, RELAY_V6, Site};
use tests_harness::coturn::{Totals, tools_present};

/// Clients per run (even: uclient pairs them up in several modes) and
/// messages per client.
const CLIENTS: u64 = 4;
const MESSAGES: u64 = 50;

/// One mode of `turnutils_uclient`.
struct Mode {
    name: &'static str,
    flags: &'static [&'static str],
    /// The relayed address is IPv6 whatever the client's family (`-x`).
    ipv6_relay: bool,
    /// Whether channel data of this mode is relayed in the kernel (UDP
    /// clients with channels).
    in_kernel: bool,
}

const MODES: &[Mode] = &[
    Mode {
        name: "default (RTP/RTCP pairs: EVEN-PORT R, RESERVATION-TOKEN)",
        flags: &[],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-c (no RTCP)",
        flags: &["-c"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-y (client to client)",
        flags: &["-y"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-t (TCP)",
        flags: &["-t"],
        ipv6_relay: false,
        in_kernel: false,
    },
    Mode {
        name: "-t -y (TCP, client to client)",
        flags: &["-t", "-y"],
        ipv6_relay: false,
        in_kernel: false,
    },
    Mode {
        name: "-s (Send indications)",
        flags: &["-s"],
        ipv6_relay: false,
        in_kernel: false,
    },
    Mode {
        name: "-x (IPv6 relay address)",
        flags: &["-x"],
        ipv6_relay: true,
        in_kernel: true,
    },
    Mode {
        name: "-Z (dual allocation)",
        flags: &["-Z"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-G (extra requests)",
        flags: &["-G"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-B (random disconnects)",
        flags: &["-B"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-M (mobility: not supported, the client goes on without it)",
        flags: &["-M"],
        ipv6_relay: false,
        in_kernel: true,
    },
    Mode {
        name: "-g (DONT-FRAGMENT)",
        flags: &["-g"],
        ipv6_relay: false,
        in_kernel: true,
    },
];

fn run_modes(client_v6: bool) {
    if !tests::privileged() || !tools_present("coturn_modes") {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // Client to client goes through the relay's own addresses: the operator
    // opens them to both daemons, which turns on the kernel's hairpin.
    let (relay_v4, relay_v6) = (format!("{RELAY_V4}/32"), format!("{RELAY_V6}/128"));
    let allow_relay = ["--allow-peer", &relay_v4, "--allow-peer", &relay_v6];
    let mut agent_args = vec!["--xdp-mode", "native", "--metrics", AGENT_METRICS];
    agent_args.extend(allow_relay);
    let socket = lab.start_xdp_agent(&agent_args).unwrap();
    lab.start_turn_control(Some(&socket), &allow_relay).unwrap();
    lab.wait_agent_connected(Site::A).unwrap();
    for (peer, port) in [(IpAddr::V4(PEER_V4), "3480"), (IpAddr::V6(PEER_V6), "3481")] {
        let mut command = lab.peer.command("turnutils_peer");
        command.args(["-L", &peer.to_string(), "-p", port]);
        lab.spawn(&format!("turnutils_peer-{port}"), command)
            .unwrap();
    }
    let server = if client_v6 {
        IpAddr::V6(Site::A.v6())
    } else {
        IpAddr::V4(Site::A.v4())
    };
    let mut agent = Agent::connect(&socket).unwrap();
    let mut table = Vec::new();
    for mode in MODES {
        let (peer, peer_port) = if client_v6 || mode.ipv6_relay {
            (IpAddr::V6(PEER_V6), "3481")
        } else {
            (IpAddr::V4(PEER_V4), "3480")
        };
        let before = agent.relayed_in_kernel().unwrap();
        let mut uclient = lab.client.command("turnutils_uclient");
        uclient
            .args(["-u", "test", "-w", "testpass"])
            .args(["-e", &peer.to_string(), "-r", peer_port])
            .args(["-m", &CLIENTS.to_string(), "-n", &MESSAGES.to_string()])
            .args(["-l", "120", "-z", "5"])
            .args(mode.flags)
            .args(["-p", "3478", &server.to_string()]);
        let output = uclient.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let context = || {
            format!(
                "{}: uclient exited {}\n{stdout}\n{stderr}\nturn-control:\n{}",
                mode.name,
                output.status,
                lab.log("turn-control")
            )
        };
        assert!(output.status.success(), "{}", context());
        let Totals { sent, received } = Totals::parse(&stdout)
            .unwrap_or_else(|| panic!("no totals from uclient: {}", context()));
        let kernel = agent.relayed_in_kernel().unwrap() - before;
        table.push(format!(
            "{:<62} {:>6} {:>8} {:>5} {:>7}",
            mode.name,
            sent,
            received,
            sent.saturating_sub(received),
            kernel
        ));
        // uclient counts what its clients sent: at least every message of
        // every client (with RTCP, and both ways between clients, more).
        assert!(sent >= CLIENTS * MESSAGES, "{}", context());
        assert_eq!(received, sent, "every message echoed: {}", context());
        if mode.in_kernel {
            assert!(
                kernel >= sent,
                "{}: {kernel} of {sent} relayed in the kernel",
                mode.name
            );
        }
    }
    let family = if client_v6 { "IPv6" } else { "IPv4" };
    println!(
        "turnutils_uclient over {family}, {CLIENTS} clients x {MESSAGES} messages:\n{:<62} {:>6} {:>8} {:>5} {:>7}\n{}",
        "mode",
        "sent",
        "received",
        "lost",
        "kernel",
        table.join("\n")
    );

    // The STUN client: a Binding request answered with the reflexive address.
    let output = lab
        .client
        .command("turnutils_stunclient")
        .args(["-p", "3478", &server.to_string()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let client = if client_v6 {
        IpAddr::V6(tests::CLIENT_V6)
    } else {
        IpAddr::V4(tests::CLIENT_V4)
    };
    assert!(
        output.status.success() && stdout.contains(&format!("reflexive addr: {client}")),
        "turnutils_stunclient: {stdout}"
    );
}

#[test]
fn turnutils_uclient_works_in_every_mode_over_ipv4() {
    run_modes(false);
}

#[test]
fn turnutils_uclient_works_in_every_mode_over_ipv6() {
    run_modes(true);
}
