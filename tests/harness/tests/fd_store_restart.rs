//! The property turn-control's restarts rely on, end to end across real processes: a relay UDP
//! socket stored by one instance ([`daemon::fd_store`]) is kept by the service manager
//! ([`tests_harness::service_manager`]) while no instance runs, datagrams sent meanwhile stay
//! queued on it, and the next instance receives them and answers from the same address.
//!
//! The instances are this test executable run again with [`ROLE`] set, running only
//! [`instance`].

#![expect(clippy::unwrap_used, reason = "a test: a failure is a test failure")]

use std::net::UdpSocket;
use std::os::fd::AsFd as _;
use std::process::{Output, Stdio};
use std::time::Duration;

use daemon::fd_store::{self, FdStore};
use tests_harness::scratch::TempDir;
use tests_harness::service_manager::ServiceManager;

/// Which instance this process plays; unset in the test itself.
const ROLE: &str = "FD_STORE_TEST_ROLE";

/// The name the relay socket is stored under.
const RELAY: &str = "relay-udp";

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_relay_socket_and_its_queued_datagrams_survive_restarts() {
    let dir = TempDir::new("fd-store-restart");
    let manager = ServiceManager::new(&dir.0).unwrap();

    // The first instance binds the relay socket and stores it.
    let first = run_instance(&manager, "first");
    assert_eq!(manager.names(), [RELAY], "{first:?}");
    manager.wait_for("READY=1", TIMEOUT).unwrap();
    let relay = UdpSocket::from(manager.fds(RELAY).unwrap().pop().unwrap());
    let relay_address = relay.local_addr().unwrap();
    drop(relay);

    // No instance runs: a peer's datagram must wait in the stored socket.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(TIMEOUT)).unwrap();
    peer.send_to(b"sent while down", relay_address).unwrap();

    // The second instance takes the socket back, reads the datagram, answers, and stores the
    // socket again on its way out, as a daemon does that cannot know what the manager holds.
    let second = run_instance(&manager, "second");
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        stdout.contains(&format!(
            "received \"sent while down\" from {}",
            peer.local_addr().unwrap()
        )),
        "{second:?}"
    );
    let mut answer = [0; 64];
    let (length, from) = peer.recv_from(&mut answer).unwrap();
    assert_eq!(&answer[..length], b"answer from the second instance");
    assert_eq!(
        from, relay_address,
        "the answer comes from the relay address"
    );
    manager.wait_for("READY=1", TIMEOUT).unwrap();
    assert_eq!(manager.names(), [RELAY], "stored again, kept once");

    // The third releases the allocation: the manager lets go of the socket.
    let third = run_instance(&manager, "third");
    assert!(manager.names().is_empty(), "{third:?}");
}

/// One instance, run to completion; fails the test when it fails.
fn run_instance(manager: &ServiceManager, role: &str) -> Output {
    let output = manager
        .command(std::env::current_exe().unwrap())
        .unwrap()
        .args(["instance", "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the {role} instance failed: {output:#?}"
    );
    output
}

/// The daemon's part when [`ROLE`] is set; nothing otherwise.
#[test]
fn instance() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    // SAFETY: this process runs this one test (`--exact`, one test thread), and nothing else
    // in it reads or writes the environment or owns fds from 3 on meanwhile.
    let mut inherited = unsafe { fd_store::inherited() }.unwrap();
    for variable in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        assert!(
            std::env::var_os(variable).is_none(),
            "{variable} is still set"
        );
    }
    let store = FdStore::from_env().unwrap().expect("NOTIFY_SOCKET is set");
    match role.as_str() {
        "first" => {
            assert!(inherited.is_empty(), "{inherited:?}");
            let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
            store.store(RELAY, relay.as_fd()).unwrap();
            store.notify("READY=1\n").unwrap();
        }
        "second" => {
            let relay = UdpSocket::from(single(inherited.take(RELAY)));
            assert!(inherited.into_rest().is_empty());
            store.notify("READY=1\n").unwrap();
            relay.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut datagram = [0; 64];
            let (length, from) = relay.recv_from(&mut datagram).unwrap();
            let text = String::from_utf8_lossy(&datagram[..length]);
            println!("received {text:?} from {from}");
            relay
                .send_to(b"answer from the second instance", from)
                .unwrap();
            store.store(RELAY, relay.as_fd()).unwrap();
        }
        "third" => {
            drop(single(inherited.take(RELAY)));
            store.remove(RELAY).unwrap();
        }
        other => panic!("unknown role {other}"),
    }
    // The manager may otherwise see the exit before the last messages.
    store.barrier(TIMEOUT).unwrap();
}

fn single<T: std::fmt::Debug>(mut items: Vec<T>) -> T {
    assert_eq!(items.len(), 1, "{items:?}");
    items.pop().unwrap()
}
