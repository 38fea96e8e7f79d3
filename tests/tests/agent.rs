//! The agent as operators run it: every RPC and its refusals, full-state
//! Sync, restarts under traffic, address changes and the metrics endpoint.
#![expect(clippy::unwrap_used, reason = "a test: failures should panic")]

use std::io::Read;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use proto::v1::{ChannelBinding, ListChannelBindingsRequest, SetConfigRequest, SyncRequest};
use tests::agent::{self, Agent, LIFETIME, MapEntry, bare, binding, binding_via, lasting};
use tests::packet::{Capture, channel_data};
use tests::{CLIENT_V4, Lab, PEER_V4, RELAY_V4, kernel_clock_ns, sample, wait_for};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(5);
const METRICS: &str = "127.0.0.1:9642";

fn start(lab: &mut Lab) -> Agent {
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&[
            "--xdp-mode",
            "native",
            "--metrics",
            METRICS,
            // The metrics test's packets make three reports or more.
            "--event-interval",
            "64",
        ]))
        .unwrap();
    Agent::connect(&socket).unwrap()
}

fn udp(netns: &tests::Netns, ip: IpAddr) -> UdpSocket {
    let socket = netns.enter(move || Ok(UdpSocket::bind((ip, 0))?)).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    socket
}

/// Starts the agent and installs one IPv4 channel from a client socket to a
/// peer socket on allocation port 50000: the sockets and the binding.
fn one_channel_installed(lab: &mut Lab) -> (UdpSocket, UdpSocket, ChannelBinding) {
    let mut agent = start(lab);
    let client = udp(&lab.client, IpAddr::V4(CLIENT_V4));
    let peer = udp(&lab.peer, IpAddr::V4(PEER_V4));
    let bound = binding(
        client.local_addr().unwrap(),
        0x4001,
        peer.local_addr().unwrap(),
        50000,
    );
    agent.install(vec![bound.clone()]).unwrap();
    (client, peer, bound)
}

#[test]
fn every_rpc_answers_and_refuses_what_it_must() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab);
    let peer: SocketAddr = "198.51.100.2:9000".parse().unwrap();
    let a = binding("192.0.2.2:40000".parse().unwrap(), 0x4001, peer, 50000);
    let b = binding(
        "[2001:db8:1::2]:40000".parse().unwrap(),
        0x4002,
        "[2001:db8:3::2]:9".parse().unwrap(),
        50001,
    );
    let c = binding(
        "192.0.2.3:40000".parse().unwrap(),
        0x4003,
        "198.51.100.3:9".parse().unwrap(),
        50002,
    );
    assert_eq!(agent.install(vec![a.clone(), b.clone()]).unwrap(), 2);

    // Refusals: nothing of a refused batch is written.
    let refusals = [
        (
            binding("192.0.2.9:1".parse().unwrap(), 0x3fff, peer, 50000),
            "outside 0x4000-0x7fff",
        ),
        (
            binding("192.0.2.9:1".parse().unwrap(), 0x4000, peer, 3478),
            "outside the range",
        ),
        (
            binding(
                "192.0.2.9:1".parse().unwrap(),
                0x4000,
                "203.0.113.10:3478".parse().unwrap(),
                50000,
            ),
            "listener",
        ),
        (
            binding(
                "192.0.2.9:1".parse().unwrap(),
                0x4000,
                "0.0.0.0:9".parse().unwrap(),
                50000,
            ),
            "not a unicast",
        ),
        (
            ChannelBinding {
                client: "nonsense".into(),
                ..c.clone()
            },
            "not an address",
        ),
        // A binding to install needs a lifetime.
        (
            lasting(
                &binding("192.0.2.9:1".parse().unwrap(), 0x4000, peer, 50000),
                Duration::ZERO,
            ),
            "lifetime_ms 0 is outside 1-3600000",
        ),
        (
            lasting(
                &binding("192.0.2.9:1".parse().unwrap(), 0x4000, peer, 50000),
                Duration::from_secs(3601),
            ),
            "lifetime_ms 3601000 is outside",
        ),
    ];
    for (bad, reason) in refusals {
        let status = agent.install(vec![c.clone(), bad]).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{reason}");
        assert!(
            status.message().contains("bindings[1]") && status.message().contains(reason),
            "{}",
            status.message()
        );
    }
    let listed = agent.list().unwrap();
    assert_eq!(bare(listed.clone()), bare([a.clone(), b.clone()]));
    // Each with what is left of its lifetime: the coarse clock moved little.
    for binding in &listed {
        let left = Duration::from_millis(u64::from(binding.lifetime_ms));
        assert!(
            left <= LIFETIME && left > LIFETIME - DEADLINE,
            "{binding:?}"
        );
    }

    // Filters and Get.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime
        .block_on(proto::connect(lab.dir().join("agent.sock")))
        .unwrap();
    let filtered = runtime
        .block_on(client.list_channel_bindings(ListChannelBindingsRequest {
            client: "192.0.2.2".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(bare(filtered), bare([a.clone()]));
    let by_port = runtime
        .block_on(client.list_channel_bindings(ListChannelBindingsRequest {
            allocation_port: 50001,
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .bindings;
    assert_eq!(bare(by_port), bare([b.clone()]));
    let got = runtime
        .block_on(
            client.get_channel_binding(proto::v1::GetChannelBindingRequest {
                client: a.client.clone(),
                channel: a.channel,
                listener: String::new(),
            }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(bare([got.clone()]), bare([a.clone()]));
    assert!(
        got.lifetime_ms > 0 && got.lifetime_ms <= a.lifetime_ms,
        "{got:?}"
    );
    let missing = runtime
        .block_on(
            client.get_channel_binding(proto::v1::GetChannelBindingRequest {
                client: a.client.clone(),
                channel: 0x4fff,
                listener: String::new(),
            }),
        )
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Sync: c added, a kept, b removed; the generation is reported.
    let synced = agent.sync(7, &[a.clone(), c.clone()]).unwrap();
    assert_eq!((synced.added, synced.removed, synced.installed), (1, 1, 2));
    assert_eq!((synced.refused, synced.refusals.len()), (0, 0));
    assert_eq!(bare(agent.list().unwrap()), bare([a.clone(), c.clone()]));
    let health = runtime
        .block_on(client.health(proto::v1::HealthRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(health.generation, 7);
    assert_eq!(health.installed, 2);
    assert!(health.capacity >= 65536);
    assert_eq!(health.attachments.len(), 1);
    assert_eq!(
        (
            health.attachments[0].interface.as_str(),
            health.attachments[0].mode.as_str()
        ),
        ("x0", "native")
    );

    // Remove is idempotent.
    assert_eq!(agent.remove(vec![c.clone()]).unwrap(), 1);
    assert_eq!(agent.remove(vec![c.clone()]).unwrap(), 0);

    // Configuration: set, read back, refuse nonsense.
    let config = runtime
        .block_on(client.set_config(SetConfigRequest {
            port_min: Some(50000),
            port_max: Some(60000),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        (config.port_min, config.port_max, config.listeners.clone()),
        (
            50000,
            60000,
            vec!["0.0.0.0:3478".into(), "[::]:3478".into()]
        )
    );
    assert_eq!(config.next_hop, "fib");
    assert_eq!(config.relay_ipv4, RELAY_V4.to_string());
    let read = runtime
        .block_on(client.get_config(proto::v1::GetConfigRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(read, config);
    let refused = runtime
        .block_on(client.set_config(SetConfigRequest {
            listeners: Some(proto::v1::Listeners {
                addresses: vec!["203.0.113.10:55000".into()],
            }),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("listen port 55000"),
        "{}",
        refused.message()
    );
    // The port range in force now refuses a binding it allowed before.
    let outside = binding("192.0.2.9:1".parse().unwrap(), 0x4000, peer, 49999);
    assert_eq!(
        agent.install(vec![outside]).unwrap_err().code(),
        Code::InvalidArgument
    );
}

/// SetConfig narrows what the agent's own flags allow and never widens it:
/// the allocation range within --ports, the listeners within --listen (a
/// wildcard flag allows its family on its port), the relay addresses among
/// the attached interfaces'. What reaches beyond is PERMISSION_DENIED, the
/// field named, and changes nothing.
#[test]
fn set_config_cannot_reach_beyond_the_agent_s_flags() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&[
            "--xdp-mode",
            "native",
            "--ports",
            "50000-60000",
            "--listen",
            "0.0.0.0:3478,[::]:3478,203.0.113.10:443",
        ]))
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime.block_on(proto::connect(socket)).unwrap();
    let mut set = |request| runtime.block_on(client.set_config(request));
    let listeners = |addresses: &[&str]| {
        Some(proto::v1::Listeners {
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        })
    };
    // Narrower, and the relay addresses the interface has: fine.
    let narrowed = set(SetConfigRequest {
        listeners: listeners(&[
            "203.0.113.10:3478",
            "[2001:db8:2::a]:3478",
            "203.0.113.10:443",
        ]),
        port_min: Some(50000),
        port_max: Some(55000),
        relay_ipv4: Some(RELAY_V4.to_string()),
        relay_ipv6: Some(tests::RELAY_V6.to_string()),
        tail_adjust: None,
    })
    .unwrap()
    .into_inner();
    assert_eq!((narrowed.port_min, narrowed.port_max), (50000, 55000));

    let beyond = [
        (
            SetConfigRequest {
                port_min: Some(49152),
                ..Default::default()
            },
            "port_min-port_max 49152-55000 reaches outside the agent's --ports 50000-60000",
        ),
        (
            SetConfigRequest {
                port_max: Some(60001),
                ..Default::default()
            },
            "port_min-port_max 50000-60001",
        ),
        // A port the flags do not name: a DNS server's, say.
        (
            SetConfigRequest {
                listeners: listeners(&["0.0.0.0:3478", "203.0.113.10:53"]),
                ..Default::default()
            },
            "listeners: 203.0.113.10:53 is not allowed by the agent's --listen",
        ),
        // A wildcard where the flag names one address.
        (
            SetConfigRequest {
                listeners: listeners(&["0.0.0.0:443"]),
                ..Default::default()
            },
            "listeners: 0.0.0.0:443",
        ),
        // The peer's addresses are not the relay's.
        (
            SetConfigRequest {
                relay_ipv4: Some(PEER_V4.to_string()),
                ..Default::default()
            },
            "relay_ipv4 198.51.100.2 is not an address of the attached interfaces",
        ),
        (
            SetConfigRequest {
                relay_ipv6: Some(tests::PEER_V6.to_string()),
                ..Default::default()
            },
            "relay_ipv6 2001:db8:3::2",
        ),
    ];
    for (request, reason) in beyond {
        let status = set(request).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{reason}");
        assert!(status.message().contains(reason), "{}", status.message());
    }
    let read = runtime
        .block_on(client.get_config(proto::v1::GetConfigRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(read, narrowed, "nothing changed");
    assert!(
        lab.log("xdp-agent")
            .contains("SetConfig reaches beyond the agent's flags"),
        "{}",
        lab.log("xdp-agent")
    );
}

/// The agent's own peer policy, whatever turn-control asks: no binding to
/// loopback, to a denied range the agent's --allow-peer does not open, or to
/// another service of the agent's host; an allowed address of the host is
/// open on the allocation ports alone (the hairpin). Refusals are
/// PERMISSION_DENIED and name the field; a Sync leaves such bindings out.
#[test]
fn bindings_the_agent_s_peer_policy_denies_are_refused() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    // An address of the host on an interface the program is not attached to.
    lab.add_unattached_network().unwrap();
    // The lab's peers stay denied: the agent allows other networks only.
    let socket = lab
        .start_xdp_agent(&[
            "--xdp-mode",
            "native",
            "--allow-peer",
            "10.9.0.0/16",
            "--allow-peer",
            "203.0.113.0/24",
        ])
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let client: SocketAddr = "192.0.2.2:40000".parse().unwrap();
    let to = |peer: &str| binding(client, 0x4001, peer.parse().unwrap(), 50000);
    let denied = [
        (to("127.0.0.1:9000"), "peer 127.0.0.1:9000", "loopback"),
        (
            to("[::ffff:127.0.0.1]:9000"),
            "peer 127.0.0.1:9000",
            "loopback",
        ),
        (to("[::1]:9000"), "peer [::1]:9000", "loopback"),
        (to("10.1.2.3:9000"), "peer 10.1.2.3:9000", "private"),
        (to("100.64.0.1:9000"), "peer 100.64.0.1:9000", "shared"),
        (
            to("169.254.169.254:80"),
            "peer 169.254.169.254:80",
            "link-local",
        ),
        // A test net the lab does not allow (it allows 198.51.100.0/24).
        (to("192.0.2.99:9000"), "peer 192.0.2.99:9000", "reserved"),
        // The host's other services, on the relay address or another one.
        (
            to("203.0.113.10:22"),
            "peer 203.0.113.10:22",
            "an address of this host",
        ),
        (
            to("10.9.0.1:53"),
            "peer 10.9.0.1:53",
            "an address of this host",
        ),
        (
            to("[::ffff:10.9.0.1]:53"),
            "peer 10.9.0.1:53",
            "an address of this host",
        ),
        (
            binding(
                "127.0.0.1:5000".parse().unwrap(),
                0x4001,
                "10.9.0.2:9".parse().unwrap(),
                50000,
            ),
            "client 127.0.0.1:5000",
            "loopback",
        ),
        (
            binding(
                "10.9.0.1:5000".parse().unwrap(),
                0x4001,
                "10.9.0.2:9".parse().unwrap(),
                50000,
            ),
            "client 10.9.0.1:5000",
            "an address of this host",
        ),
    ];
    for (bad, field, reason) in &denied {
        let status = agent.install(vec![bad.clone()]).unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{field}");
        assert!(
            status.message().starts_with(&format!(
                "bindings[0]: {field} is refused by the agent's peer policy: "
            )) && status.message().contains(reason),
            "{}",
            status.message()
        );
    }
    assert!(agent.list().unwrap().is_empty());

    // What --allow-peer opens: another host of an allowed network, and the
    // relay's own address on an allocation port.
    let allowed = ["10.9.0.2:9000", "203.0.113.1:9000", "203.0.113.10:50001"]
        .iter()
        .zip(0u16..)
        .map(|(peer, i)| {
            let client = SocketAddr::new(client.ip(), 40001 + i);
            binding(client, 0x4001 + i, peer.parse().unwrap(), 50000 + i)
        })
        .collect::<Vec<_>>();
    assert_eq!(agent.install(allowed.clone()).unwrap(), 3);

    // A Sync leaves the denied ones out, each with its reason.
    let mut set = allowed.clone();
    set.push(denied[0].0.clone());
    let synced = agent.sync(5, &set).unwrap();
    assert_eq!((synced.installed, synced.refused), (3, 1));
    assert!(
        synced.refusals[0].starts_with("bindings[3]: peer 127.0.0.1:9000 is refused"),
        "{:?}",
        synced.refusals
    );
}

/// Scrapes the metrics endpoint from inside the relay's namespace.
fn scrape(lab: &Lab) -> String {
    lab.relay
        .enter(|| {
            let mut stream = TcpStream::connect(METRICS)?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })
        .unwrap()
}

/// The datagrams the metrics test relays.
const DATAGRAMS: usize = 320;

#[test]
fn metrics_are_prometheus_text_and_count_the_relayed_bytes() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab);
    let client = udp(&lab.client, IpAddr::V4(CLIENT_V4));
    let peer = udp(&lab.peer, IpAddr::V4(PEER_V4));
    agent
        .install(vec![binding(
            client.local_addr().unwrap(),
            0x4001,
            peer.local_addr().unwrap(),
            50000,
        )])
        .unwrap();
    // 320 datagrams of 100 bytes. Reports are due every 64 packets of one CPU, and a
    // sender that moves between CPUs splits the count: on two CPUs, 320 make at least
    // four reports however they split (3 * 64 + 63 is the least that makes three).
    let mut buffer = [0u8; 2048];
    for _ in 0..DATAGRAMS {
        client
            .send_to(&channel_data(0x4001, &[7u8; 100]), (RELAY_V4, 3478))
            .unwrap();
        peer.recv_from(&mut buffer)
            .expect("the peer received nothing");
    }
    let body = wait_for(
        "metrics to show the relayed bytes",
        Duration::from_secs(10),
        || {
            let response = scrape(&lab);
            let body = response
                .split("\r\n\r\n")
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            // The agent refreshes its metrics once a second, and reads the perf events on
            // a thread of their own: both may lag the traffic.
            let relayed = sample(&body, "data_relayed_ebpf_bytes_total", "");
            let events = sample(&body, "xdp_perf_events_total", "").unwrap_or(0.0);
            Ok((relayed == Some(DATAGRAMS as f64 * 100.0) && events >= 3.0).then_some(body))
        },
    )
    .unwrap();
    assert_eq!(
        sample(&body, "data_relayed_ebpf_packets_total", ""),
        Some(DATAGRAMS as f64)
    );
    assert_eq!(
        sample(
            &body,
            "xdp_packets_total",
            "reason=\"relay_client_to_peer_v4_v4\""
        ),
        Some(DATAGRAMS as f64)
    );
    assert_eq!(sample(&body, "xdp_bindings_installed", ""), Some(1.0));
    assert_eq!(sample(&body, "xdp_perf_events_lost_total", ""), Some(0.0));
    assert_eq!(
        sample(&body, "xdp_attached", "interface=\"x0\",mode=\"native\"").or(sample(
            &body,
            "xdp_attached",
            "mode=\"native\""
        )),
        Some(1.0)
    );
    // Every line is a comment or `name{labels} value`.
    for line in body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{line}");
        assert!(name.chars().next().unwrap().is_ascii_alphabetic(), "{line}");
    }
    let counters = agent.counter("relay_client_to_peer_v4_v4").unwrap();
    assert_eq!(counters, (DATAGRAMS as u64, DATAGRAMS as u64 * 100));
    tests::promtool_check_metrics(&body).unwrap();
}

/// SIGKILL the agent while channel data flows, start it again: every
/// datagram still reaches the peer through XDP, and the new agent adopts the
/// maps with their bindings.
#[test]
fn a_killed_agent_restarts_without_interrupting_offloaded_traffic() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (client, peer, bound) = one_channel_installed(&mut lab);

    let mut sent = 0u64;
    let mut buffer = [0u8; 2048];
    let mut exchange = |sent: &mut u64| {
        client
            .send_to(&channel_data(0x4001, &sent.to_be_bytes()), (RELAY_V4, 3478))
            .unwrap();
        let (len, _) = peer.recv_from(&mut buffer).expect("a datagram was lost");
        assert_eq!(&buffer[..len], &sent.to_be_bytes());
        *sent += 1;
    };
    for _ in 0..50 {
        exchange(&mut sent);
    }
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    // Dead agent: the pinned link and maps keep relaying.
    for _ in 0..50 {
        exchange(&mut sent);
    }
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&["--xdp-mode", "native"]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    for _ in 0..50 {
        exchange(&mut sent);
    }
    assert_eq!(bare(agent.list().unwrap()), bare([bound]));
    // Everything went through XDP: the counters survived with the maps.
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap().0, sent);
    assert_eq!(agent.counter("pass_unknown_binding").unwrap().0, 0);
    assert!(
        lab.log("xdp-agent").contains("adopted"),
        "{}",
        lab.log("xdp-agent")
    );

    // A clean stop detaches and unpins: traffic goes to the stack.
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert!(!lab.pin_dir().join("link-x0").exists());
    assert!(!lab.pin_dir().join("CLIENT_V4").exists());
    client
        .send_to(&channel_data(0x4001, b"after stop"), (RELAY_V4, 3478))
        .unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let started = Instant::now();
    assert!(
        peer.recv_from(&mut buffer).is_err(),
        "relayed after a clean stop"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
}

/// Two agents on one pin directory would share its maps, the second one's
/// configuration silently changing the first one's data plane: the second
/// is refused (and so is `detach`) while the first runs, and adopts the
/// pinned state once it is gone.
#[test]
fn a_second_agent_on_the_same_pin_directory_is_refused_until_the_first_is_gone() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (_client, _peer, bound) = one_channel_installed(&mut lab);
    let agent_binary = tests::workspace_binary("xdp-agent").unwrap();
    let second = lab
        .relay
        .command(&agent_binary)
        .args(["--iface", "x0", "--xdp-mode", "native", "--grpc"])
        .arg(lab.dir().join("second.sock"))
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another xdp-agent is using the pin directory"),
        "{stderr}"
    );
    let detach = lab
        .relay
        .command(&agent_binary)
        .args(["detach", "--pin-dir"])
        .arg(lab.pin_dir())
        .output()
        .unwrap();
    assert_eq!(detach.status.code(), Some(1));
    assert!(lab.pin_dir().join("CLIENT_V4").exists(), "detach refused");

    // The first one dies without cleaning up: the lock goes with it.
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&["--xdp-mode", "native"]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    assert_eq!(bare(agent.list().unwrap()), bare([bound]));
}

/// An upgrade that adds a verdict reason: the pinned per-reason counters of
/// the older version are one entry short. The agent replaces that map alone
/// and keeps the installed bindings, which go on relaying in the kernel.
#[test]
fn a_pinned_stats_map_of_another_length_is_replaced_and_the_bindings_kept() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (client, peer, bound) = one_channel_installed(&mut lab);
    lab.take_process("xdp-agent")
        .unwrap()
        .stop(nix::sys::signal::Signal::SIGKILL)
        .unwrap();

    // What an older version left pinned: the same map, one reason shorter.
    let stats = lab.pin_dir().join("STATS");
    std::fs::remove_file(&stats).unwrap();
    let mut older = libbpf_rs::MapHandle::create(
        libbpf_rs::MapType::PercpuArray,
        Some("STATS"),
        4,
        size_of::<bpf_common::Counter>() as u32,
        bpf_common::REASON_COUNT - 1,
        &libbpf_rs::libbpf_sys::bpf_map_create_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as u64,
            ..Default::default()
        },
    )
    .unwrap();
    older.pin(&stats).unwrap();
    drop(older);

    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&["--xdp-mode", "native"]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    assert_eq!(bare(agent.list().unwrap()), bare([bound]));
    let log = lab.log("xdp-agent");
    assert!(log.contains("adopted"), "{log}");
    assert!(log.contains("start again from zero"), "{log}");
    let mut buffer = [0u8; 64];
    client
        .send_to(&channel_data(0x4001, b"after upgrade"), (RELAY_V4, 3478))
        .unwrap();
    let (len, _) = peer.recv_from(&mut buffer).expect("not relayed");
    assert_eq!(&buffer[..len], b"after upgrade");
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap().0, 1);
}

/// The relay's interface gets a new address and loses the old: the agent
/// follows through netlink and the data plane relays on the new one.
#[test]
fn the_data_plane_follows_the_interface_address() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let socket = lab
        .start_xdp_agent(&agent::with_lab_peers(&[
            "--xdp-mode",
            "native",
            "--log-level",
            "xdp_agent=debug",
        ]))
        .unwrap();
    let mut agent = Agent::connect(&socket).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime
        .block_on(proto::connect(lab.dir().join("agent.sock")))
        .unwrap();
    let mut relay_ipv4 = || {
        runtime
            .block_on(client.get_config(proto::v1::GetConfigRequest {}))
            .unwrap()
            .into_inner()
            .relay_ipv4
    };
    assert_eq!(relay_ipv4(), RELAY_V4.to_string(), "learned at start");

    // The new address joins the old one's subnet as a secondary; promote it
    // when the primary goes, as operators renumbering a host would.
    lab.relay
        .exec("sysctl", ["-qw", "net.ipv4.conf.x0.promote_secondaries=1"])
        .unwrap();
    lab.relay
        .ip(["addr", "add", "203.0.113.20/24", "dev", "x0"])
        .unwrap();
    lab.relay
        .ip(["addr", "del", "203.0.113.10/24", "dev", "x0"])
        .unwrap();
    let learned = wait_for("the agent to learn 203.0.113.20", DEADLINE, || {
        Ok((relay_ipv4() == "203.0.113.20").then_some(()))
    });
    if let Err(error) = learned {
        panic!(
            "{error:#}\n{}\n{}",
            lab.relay.ip(["addr", "show", "x0"]).unwrap(),
            lab.log("xdp-agent")
        );
    }

    let user = udp(&lab.client, IpAddr::V4(CLIENT_V4));
    let peer = udp(&lab.peer, IpAddr::V4(PEER_V4));
    // turn-control listens on the wildcard, which now stands for the new address.
    agent
        .install(vec![binding_via(
            "0.0.0.0:3478".parse().unwrap(),
            user.local_addr().unwrap(),
            0x4001,
            peer.local_addr().unwrap(),
            50000,
        )])
        .unwrap();
    assert_eq!(
        agent.list().unwrap()[0].listener,
        "203.0.113.20:3478",
        "resolved to the new address"
    );
    user.send_to(
        &channel_data(0x4001, b"new address"),
        ("203.0.113.20", 3478),
    )
    .unwrap();
    let mut buffer = [0u8; 64];
    let (len, from) = peer
        .recv_from(&mut buffer)
        .expect("nothing relayed on the new address");
    assert_eq!(&buffer[..len], b"new address");
    assert_eq!(from, "203.0.113.20:50000".parse().unwrap());
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap().0, 1);
}

/// The entries of the pinned binding map `name`: key and value bytes
/// without the expiry, sorted.
fn map_entries(lab: &Lab, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    agent::map_entries(&lab.pin_dir(), name)
        .unwrap()
        .iter()
        .map(MapEntry::identity)
        .collect()
}

/// The two entries a binding the tests name is installed as: the
/// client-side one and the peer-side one, as key and value bytes without
/// the expiry.
fn entries_of(bound: &ChannelBinding) -> [(Vec<u8>, Vec<u8>); 2] {
    agent::entries_of(bound, 0)
        .unwrap()
        .map(|entry| entry.identity())
}

/// Waits until the agent's counter `reason` counts `packets`.
fn wait_for_counter(agent: &mut Agent, reason: &str, packets: u64) {
    wait_for(&format!("{reason} to count {packets}"), DEADLINE, || {
        Ok((agent.counter(reason)?.0 == packets).then_some(()))
    })
    .unwrap();
}

/// A channel rebound to another peer (same client key, another peer and
/// allocation port): the old peer's entry goes with the old binding, so its
/// datagrams no longer reach the client through the kernel.
#[test]
fn a_rebound_channel_leaves_no_peer_entry_behind() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (client, old_peer, old) = one_channel_installed(&mut lab);
    let mut agent = Agent::connect(&lab.dir().join("agent.sock")).unwrap();
    let new_peer = udp(&lab.peer, IpAddr::V4(PEER_V4));
    let new = binding(
        client.local_addr().unwrap(),
        0x4001,
        new_peer.local_addr().unwrap(),
        50001,
    );
    assert_eq!(agent.install(vec![new.clone()]).unwrap(), 1);
    assert_eq!(bare(agent.list().unwrap()), bare([new.clone()]));
    let [client_entry, peer_entry] = entries_of(&new);
    assert_eq!(map_entries(&lab, "CLIENT_V4"), vec![client_entry]);
    assert_eq!(map_entries(&lab, "PEER_V4"), vec![peer_entry]);
    assert_ne!(
        entries_of(&old)[1].0,
        entries_of(&new)[1].0,
        "another peer key"
    );

    // The old peer's datagram is passed to the stack, not relayed to the client.
    old_peer.send_to(b"stale path", (RELAY_V4, 50000)).unwrap();
    wait_for_counter(&mut agent, "pass_unknown_peer", 1);
    assert_eq!(agent.counter("relay_peer_to_client_v4_v4").unwrap().0, 0);
    // The new one is relayed both ways.
    client
        .send_to(&channel_data(0x4001, b"to the new peer"), (RELAY_V4, 3478))
        .unwrap();
    let mut buffer = [0u8; 64];
    let (len, from) = new_peer.recv_from(&mut buffer).expect("not relayed");
    assert_eq!(&buffer[..len], b"to the new peer");
    assert_eq!(from, SocketAddr::new(IpAddr::V4(RELAY_V4), 50001));
    new_peer.send_to(b"back", (RELAY_V4, 50001)).unwrap();
    let (len, _) = client.recv_from(&mut buffer).expect("not relayed back");
    assert_eq!(&buffer[..len], &channel_data(0x4001, b"back")[..]);
}

/// Another client bound to the same peer key (same peer, same allocation
/// port): the peer's datagrams now go to the new client, and the old
/// client's entry, which would relay one way to that peer, goes.
#[test]
fn a_peer_key_taken_by_another_client_removes_the_old_clients_half() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (old_client, peer, _old) = one_channel_installed(&mut lab);
    let mut agent = Agent::connect(&lab.dir().join("agent.sock")).unwrap();
    let new_client = udp(&lab.client, IpAddr::V4(CLIENT_V4));
    let new = binding(
        new_client.local_addr().unwrap(),
        0x4002,
        peer.local_addr().unwrap(),
        50000,
    );
    assert_eq!(agent.install(vec![new.clone()]).unwrap(), 1);
    assert_eq!(bare(agent.list().unwrap()), bare([new.clone()]));
    let [client_entry, peer_entry] = entries_of(&new);
    assert_eq!(map_entries(&lab, "CLIENT_V4"), vec![client_entry]);
    assert_eq!(map_entries(&lab, "PEER_V4"), vec![peer_entry]);

    // The old client's channel data is passed to the stack, not relayed.
    old_client
        .send_to(&channel_data(0x4001, b"one way"), (RELAY_V4, 3478))
        .unwrap();
    wait_for_counter(&mut agent, "pass_unknown_binding", 1);
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap().0, 0);
    peer.send_to(b"to the new client", (RELAY_V4, 50000))
        .unwrap();
    let mut buffer = [0u8; 64];
    let (len, _) = new_client.recv_from(&mut buffer).expect("not relayed");
    assert_eq!(
        &buffer[..len],
        &channel_data(0x4002, b"to the new client")[..]
    );
}

/// Half bindings in the maps, whatever left them (here written behind the
/// agent's back): a peer-side entry no binding has, and a wanted binding's
/// missing peer-side entry. Sync deletes the first and writes the second.
#[test]
fn sync_reconciles_the_peer_side_maps_too() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (_client, _peer, wanted) = one_channel_installed(&mut lab);
    let orphan = binding(
        "192.0.2.77:40000".parse().unwrap(),
        0x4005,
        "198.51.100.77:9000".parse().unwrap(),
        50005,
    );
    let [wanted_client, wanted_peer] = entries_of(&wanted);
    let [_, orphan_peer] = agent::entries_of(&orphan, u64::MAX).unwrap();
    {
        use libbpf_rs::MapCore as _;
        let peers = libbpf_rs::MapHandle::from_pinned_path(lab.pin_dir().join("PEER_V4")).unwrap();
        peers
            .update(
                &orphan_peer.key,
                &orphan_peer.value_bytes(),
                libbpf_rs::MapFlags::ANY,
            )
            .unwrap();
        peers.delete(&wanted_peer.0).unwrap();
    }
    assert_eq!(map_entries(&lab, "PEER_V4"), vec![orphan_peer.identity()]);

    let mut agent = Agent::connect(&lab.dir().join("agent.sock")).unwrap();
    let synced = agent.sync(1, std::slice::from_ref(&wanted)).unwrap();
    // The repaired binding is written again; the orphan counts as removed.
    assert_eq!((synced.added, synced.removed, synced.installed), (1, 1, 1));
    assert_eq!(map_entries(&lab, "CLIENT_V4"), vec![wanted_client]);
    assert_eq!(map_entries(&lab, "PEER_V4"), vec![wanted_peer]);
    assert!(map_entries(&lab, "CLIENT_V6").is_empty());
    assert!(map_entries(&lab, "PEER_V6").is_empty());
}

/// What the pinned binding map `name` holds at `key` (without the
/// expiry), and how many entries it has.
fn map_lookup(lab: &Lab, name: &str, key: &[u8]) -> (Option<Vec<u8>>, usize) {
    use libbpf_rs::MapCore as _;
    let map = libbpf_rs::MapHandle::from_pinned_path(lab.pin_dir().join(name)).unwrap();
    let value = map.lookup(key, libbpf_rs::MapFlags::ANY).unwrap();
    let value = value.map(|value| MapEntry::new(key, &value).unwrap().value);
    (value, map.keys().count())
}

/// With every map full, a rebound channel still fits (its old peer entry
/// makes room for the new one), and a batch that fails midway puts back
/// what it displaced as well as what it wrote.
#[test]
fn a_rebind_in_full_maps_fits_and_a_failed_batch_restores_what_it_displaced() {
    if !tests::privileged() {
        return;
    }
    const CAPACITY: u32 = 65_536;
    let nth = |i: u32| {
        let client = SocketAddr::new(IpAddr::from([192, 0, 2, 2 + (i / 60_000) as u8]), 1);
        let peer = SocketAddr::new(IpAddr::from([198, 51, 100, 2 + (i / 60_000) as u8]), 9);
        let port = 1 + (i % 60_000) as u16;
        binding(
            SocketAddr::new(client.ip(), port),
            0x4001,
            SocketAddr::new(peer.ip(), port),
            50_000,
        )
    };
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab);
    for batch in (0..CAPACITY).collect::<Vec<_>>().chunks(4096) {
        agent
            .install(batch.iter().map(|&i| nth(i)).collect())
            .unwrap();
    }
    let old = nth(0);
    let rebound = ChannelBinding {
        peer: "198.51.100.250:7".into(),
        allocation_port: 50001,
        ..old.clone()
    };
    let fresh = binding(
        "192.0.2.250:1".parse().unwrap(),
        0x4001,
        "198.51.100.251:7".parse().unwrap(),
        50002,
    );
    let [old_client, old_peer] = entries_of(&old);
    let [new_client, new_peer] = entries_of(&rebound);
    let full = CAPACITY as usize;

    let refused = agent
        .install(vec![rebound.clone(), fresh.clone()])
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let client_map = map_lookup(&lab, "CLIENT_V4", &old_client.0);
    assert_eq!(client_map, (Some(old_client.1.clone()), full));
    assert_eq!(
        map_lookup(&lab, "PEER_V4", &old_peer.0),
        (Some(old_peer.1.clone()), full),
        "the displaced peer entry is back"
    );
    assert_eq!(map_lookup(&lab, "PEER_V4", &new_peer.0).0, None);

    // Alone, the rebind fits: the old peer entry made room for the new one.
    assert_eq!(
        agent.install(vec![rebound.clone()]).unwrap(),
        u64::from(CAPACITY)
    );
    assert_eq!(
        map_lookup(&lab, "CLIENT_V4", &new_client.0),
        (Some(new_client.1), full)
    );
    assert_eq!(
        map_lookup(&lab, "PEER_V4", &new_peer.0),
        (Some(new_peer.1), full)
    );
    assert_eq!(map_lookup(&lab, "PEER_V4", &old_peer.0).0, None);
}

/// The value of the agent's metric `name` (no labels), once it is served.
fn metric(lab: &Lab, name: &str) -> Option<f64> {
    let response = scrape(lab);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    sample(body, name, "")
}

/// Whether neither IPv4 binding map holds an entry.
fn v4_maps_empty(lab: &Lab) -> bool {
    map_entries(lab, "CLIENT_V4").is_empty() && map_entries(lab, "PEER_V4").is_empty()
}

/// A binding installed for 1.5 s leaves both maps once that has passed,
/// and is counted as expired; one refreshed (installed again with a longer
/// lifetime) before its expiry outlives it.
#[test]
fn a_binding_leaves_the_maps_when_its_lifetime_ends_unless_refreshed() {
    if !tests::privileged() {
        return;
    }
    let short = Duration::from_millis(1500);
    let nanos = |lifetime: Duration| u64::try_from(lifetime.as_nanos()).unwrap();
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab);
    let nth = |i: u8| {
        let client = SocketAddr::from(([192, 0, 2, 10 + i], 40000));
        let peer = SocketAddr::from(([198, 51, 100, 10 + i], 9000));
        lasting(&binding(client, 0x4001, peer, 50000 + u16::from(i)), short)
    };

    let before = kernel_clock_ns();
    assert_eq!(agent.install(vec![nth(0)]).unwrap(), 1);
    let after = kernel_clock_ns();
    // Both entries expire at the install's clock plus the lifetime.
    let expiries = ["CLIENT_V4", "PEER_V4"].map(|name| {
        let entries = agent::map_entries(&lab.pin_dir(), name).unwrap();
        assert_eq!(entries.len(), 1, "{name}");
        entries[0].expires_at_ns
    });
    assert_eq!(expiries[0], expiries[1]);
    let expires = expiries[0];
    assert!(
        (before + nanos(short)..=after + nanos(short)).contains(&expires),
        "{before} {expires} {after}"
    );
    wait_for("the expired binding to leave both maps", DEADLINE, || {
        Ok(v4_maps_empty(&lab).then_some(()))
    })
    .unwrap();
    assert!(kernel_clock_ns() >= expires, "deleted before its expiry");
    assert!(agent.list().unwrap().is_empty());
    assert_eq!(agent.counters().unwrap().expired_bindings, 1);
    assert_eq!(agent.health().unwrap().installed, 0);
    wait_for("xdp_bindings_expired_total to count it", DEADLINE, || {
        Ok((metric(&lab, "xdp_bindings_expired_total") == Some(1.0)).then_some(()))
    })
    .unwrap();
    assert_eq!(metric(&lab, "xdp_bindings_installed"), Some(0.0));

    // Refreshed before its expiry: it outlives a witness of the same first
    // lifetime, whose deletion shows that a sweep ran past that expiry.
    let refreshed = nth(1);
    let witness = nth(2);
    agent
        .install(vec![refreshed.clone(), witness.clone()])
        .unwrap();
    let longer = Duration::from_secs(6);
    let refreshed_at = kernel_clock_ns();
    assert_eq!(agent.install(vec![lasting(&refreshed, longer)]).unwrap(), 2);
    wait_for("the witness to expire", DEADLINE, || {
        Ok((agent.list()?.len() == 1).then_some(()))
    })
    .unwrap();
    let listed = agent.list().unwrap();
    assert_eq!(bare(listed.clone()), bare([refreshed.clone()]));
    assert!(
        listed[0].lifetime_ms > 0 && u64::from(listed[0].lifetime_ms) <= 6000,
        "{listed:?}"
    );
    for name in ["CLIENT_V4", "PEER_V4"] {
        let entries = agent::map_entries(&lab.pin_dir(), name).unwrap();
        assert_eq!(entries.len(), 1, "{name}");
        assert!(entries[0].expires_at_ns >= refreshed_at + nanos(longer));
    }
    assert_eq!(agent.counters().unwrap().expired_bindings, 2);
    assert_eq!(agent.health().unwrap().installed, 1);
}

/// A Sync applies what it can: an invalid binding is left out, counted and
/// explained with its index over the whole stream (the first eight
/// reasons), and the valid ones are installed under the generation.
#[test]
fn a_sync_leaves_out_the_invalid_bindings_and_applies_the_rest() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let mut agent = start(&mut lab);
    let valid = |i: u8| {
        let client = SocketAddr::from(([192, 0, 2, 10 + i], 40000));
        let peer = SocketAddr::from(([198, 51, 100, 10 + i], 9000));
        binding(client, 0x4001, peer, 50000 + u16::from(i))
    };
    let outside = |i: u8| ChannelBinding {
        allocation_port: 3478,
        ..valid(100 + i)
    };
    let mut set: Vec<ChannelBinding> = (0..5).map(valid).collect();
    set.insert(3, outside(0));
    let synced = agent.sync(3, &set).unwrap();
    assert_eq!(
        (
            synced.generation,
            synced.added,
            synced.removed,
            synced.installed,
            synced.refused
        ),
        (3, 5, 0, 5, 1)
    );
    assert_eq!(
        synced.refusals,
        ["bindings[3]: allocation port 3478 is outside the range 49152-65535"]
    );
    assert_eq!(bare(agent.list().unwrap()), bare((0..5).map(valid)));
    assert_eq!(agent.health().unwrap().generation, 3);

    // Over several parts: indexes count over the stream, the first eight
    // reasons are given, every refusal is counted.
    let parts = vec![
        SyncRequest {
            generation: 4,
            bindings: vec![valid(0), outside(0)],
        },
        SyncRequest {
            generation: 4,
            bindings: std::iter::once(valid(1))
                .chain((1..11).map(outside))
                .collect(),
        },
    ];
    let synced = agent.sync_parts(parts).unwrap();
    assert_eq!(
        (
            synced.added,
            synced.removed,
            synced.installed,
            synced.refused
        ),
        (0, 3, 2, 11)
    );
    assert_eq!(synced.refusals.len(), 8);
    assert!(
        synced.refusals[0].starts_with("bindings[1]: "),
        "{:?}",
        synced.refusals
    );
    assert!(
        synced.refusals[1].starts_with("bindings[3]: "),
        "{:?}",
        synced.refusals
    );
    assert_eq!(bare(agent.list().unwrap()), bare([valid(0), valid(1)]));
    wait_for("xdp_agent_sync_refused_bindings_total", DEADLINE, || {
        Ok((metric(&lab, "xdp_agent_sync_refused_bindings_total") == Some(12.0)).then_some(()))
    })
    .unwrap();
}

/// The parts of one Sync carry one generation: a stream that mixes two, or
/// that carries none, is refused and changes nothing.
#[test]
fn a_sync_whose_parts_carry_different_generations_is_refused() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (_client, _peer, installed) = one_channel_installed(&mut lab);
    let mut agent = Agent::connect(&lab.dir().join("agent.sock")).unwrap();
    let other = binding(
        "192.0.2.20:40000".parse().unwrap(),
        0x4002,
        "198.51.100.20:9000".parse().unwrap(),
        50020,
    );
    let part = |generation| SyncRequest {
        generation,
        bindings: vec![other.clone()],
    };
    let refused = agent.sync_parts(vec![part(4), part(5)]).unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("generations 4 and 5"),
        "{}",
        refused.message()
    );
    let refused = agent.sync_parts(Vec::new()).unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("at least one part"),
        "{}",
        refused.message()
    );
    assert_eq!(bare(agent.list().unwrap()), bare([installed]));
    assert_eq!(agent.health().unwrap().generation, 0);
}

/// Clears the DF bit on what `socket` sends over IPv4 (`IP_PMTUDISC_DONT`),
/// so that a DF bit on the relayed datagram is the relay's doing.
fn clear_df(socket: &UdpSocket) {
    use nix::libc;
    use std::os::fd::AsRawFd as _;
    let value: libc::c_int = libc::IP_PMTUDISC_DONT;
    // SAFETY: the pointer and length describe `value`, which outlives the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "{}", std::io::Error::last_os_error());
}

/// DONT-FRAGMENT is part of a binding (RFC 8656 section 7.2): installed, it
/// is stored in the client-side entry and listed, and the relayed datagram
/// reaches the peer with DF set although the client sent it without; a Sync
/// with the binding as it was before switches it back, and the binding is
/// removed by naming it as it is installed.
#[test]
fn dont_fragment_is_stored_listed_and_sets_df_on_the_wire() {
    if !tests::privileged() {
        return;
    }
    let mut lab = Lab::new().unwrap();
    let (client, peer, plain) = one_channel_installed(&mut lab);
    clear_df(&client);
    let mut agent = Agent::connect(&lab.dir().join("agent.sock")).unwrap();
    let capture = lab.peer.enter(|| Capture::open("p0")).unwrap();
    let peer_address = peer.local_addr().unwrap();
    // Sends `payload` through the relay; the frame the peer received.
    let relay = |payload: &[u8]| {
        client
            .send_to(&channel_data(0x4001, payload), (RELAY_V4, 3478))
            .unwrap();
        let mut buffer = [0u8; 64];
        let (len, _) = peer.recv_from(&mut buffer).expect("not relayed");
        assert_eq!(&buffer[..len], payload);
        capture
            .next_udp_v4(DEADLINE, |frame| {
                SocketAddr::V4(frame.destination) == peer_address && frame.payload == payload
            })
            .unwrap()
    };
    assert!(!relay(b"as the client sent it").dont_fragment);

    let flagged = ChannelBinding {
        dont_fragment: true,
        ..plain.clone()
    };
    assert_eq!(agent.install(vec![flagged.clone()]).unwrap(), 1);
    assert_eq!(bare(agent.list().unwrap()), bare([flagged.clone()]));
    let [client_entry, peer_entry] = entries_of(&flagged);
    assert_eq!(client_entry.1[21], bpf_common::PEER_DONT_FRAGMENT);
    assert_eq!(map_entries(&lab, "CLIENT_V4"), vec![client_entry]);
    assert_eq!(map_entries(&lab, "PEER_V4"), vec![peer_entry]);
    // Relayed in the kernel with DF; `next_udp_v4` checked the header checksum.
    let frame = relay(b"with DF");
    assert!(frame.dont_fragment);
    assert_eq!(agent.counter("relay_client_to_peer_v4_v4").unwrap().0, 2);

    // The set as turn-control holds it, without the flag: the binding is
    // replaced, and relayed without DF again.
    let synced = agent.sync(1, std::slice::from_ref(&plain)).unwrap();
    assert_eq!((synced.added, synced.removed, synced.installed), (1, 1, 1));
    assert_eq!(bare(agent.list().unwrap()), bare([plain.clone()]));
    assert_eq!(
        map_entries(&lab, "CLIENT_V4"),
        vec![entries_of(&plain)[0].clone()]
    );
    assert!(!relay(b"without DF again").dont_fragment);
    assert_eq!(agent.remove(vec![plain]).unwrap(), 1);
    assert!(v4_maps_empty(&lab));
}
