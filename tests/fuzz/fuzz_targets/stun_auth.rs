//! STUN/TURN message decoding and authentication: one message (or, over TCP, a byte stream
//! split with `frame_len`) into `Server::handle_client`.
//!
//! Input: a flags byte, then the message. Flags:
//! - bit 0: TCP instead of UDP;
//! - bit 1: re-sign the message (valid USERNAME, REALM, NONCE and MESSAGE-INTEGRITY), so
//!   the fuzzer reaches past authentication;
//! - bit 2: sign as the REST API user instead of the static one;
//! - bit 3: add FINGERPRINT when signing;
//! - bit 4: allocate first (a real Allocate exchange), so that Refresh, CreatePermission,
//!   ChannelBind, Send and ChannelData meet an allocation;
//! - bit 5: sign with a wrong key;
//! - bit 6: an IPv6 client.
//!
//! Checks: no panic; every answer goes to the client that asked, is one well-formed STUN
//! message or ChannelData, and a TCP answer frames to its own length.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tests_fuzz::{
    LISTEN, LISTEN6, PASSWORD, REST_USER, USER, exchange, fetch_nonce, rest_key, sa, server, sign,
    user_key,
};
use tests_stun::{Answer, Msg, attr, class, method};
use turn_control_core::{ClientAddr, Command, Transmit, Transport, frame_len};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, message)) = data.split_first() else {
        return;
    };
    let transport = if flags & 1 != 0 {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let (local, client) = if flags & 0x40 != 0 {
        (sa(LISTEN6), ClientAddr(sa("[2001:db8:1::5]:40000")))
    } else {
        (sa(LISTEN), ClientAddr(sa("192.0.2.5:40000")))
    };
    let now = Instant::now();
    let mut server = server(now);
    let (user, mut key) = if flags & 4 != 0 {
        (REST_USER, rest_key())
    } else {
        (USER, user_key(USER, PASSWORD))
    };

    let nonce = if flags & 0x12 != 0 {
        fetch_nonce(&mut server, now, transport, local, client)
    } else {
        None
    };
    if flags & 0x10 != 0 {
        let nonce = nonce.as_deref().expect("a 401 carries a NONCE");
        let mut m = Msg::new(method::ALLOCATE, class::REQUEST, [0xA1; 12]);
        m.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
        let request = sign(&m.finish(None, false), user, &key, nonce, false);
        let answers = exchange(&mut server, now, transport, local, client, &request);
        let success = answers
            .iter()
            .filter_map(|a| Answer::parse_exact(a))
            .any(|d| d.class == class::SUCCESS && d.method == method::ALLOCATE);
        assert!(success, "a valid Allocate succeeds");
    }
    if flags & 0x20 != 0 {
        key[0] ^= 1;
    }
    let bytes = match (&nonce, flags & 2 != 0) {
        (Some(nonce), true) => sign(message, user, &key, nonce, flags & 8 != 0),
        _ => message.to_vec(),
    };

    let later = now + Duration::from_millis(5);
    match transport {
        Transport::Udp => server.handle_client(later, transport, local, client, &bytes),
        Transport::Tcp => {
            // What the daemon does with a stream: frame, hand over whole frames, close on error.
            let mut rest = &bytes[..];
            while let Ok(Some(n)) = frame_len(rest)
                && let Some(frame) = rest.get(..n)
            {
                server.handle_client(later, transport, local, client, frame);
                rest = &rest[n..];
            }
        }
    }
    while let Some(command) = server.poll_command() {
        match command {
            Command::InstallChannel { binding, .. } => {
                assert_eq!(binding.client, client);
                assert_eq!(binding.transport, Transport::Udp);
            }
            Command::BindRelayPort { relay, .. } => server.relay_bound(later, relay),
            _ => {}
        }
    }
    while let Some(transmit) = server.poll_transmit() {
        let Transmit::ToClient {
            client: to,
            transport: t,
            payload,
            ..
        } = transmit
        else {
            continue;
        };
        assert_eq!(to, client);
        assert_eq!(t, transport);
        if payload[0] & 0xC0 == 0 {
            assert!(
                Answer::parse_exact(&payload).is_some(),
                "malformed STUN answer"
            );
        }
        if transport == Transport::Tcp {
            assert_eq!(frame_len(&payload), Ok(Some(payload.len())));
        }
    }
    // Everything expires.
    server.handle_timeout(now + Duration::from_secs(30 * 86_400));
    assert_eq!(server.allocation_count(), 0);
});
