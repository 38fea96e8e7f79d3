//! Channels that user space relays although the kernel could go back to the data plane:
//! every one of them when the daemon's link to it comes up again, and each one that its
//! client refreshes while the link is up; through the harness of `server_tests.rs`.

use super::*;
use crate::config::PERMISSION_LIFETIME;

/// Binds channel `n` of `client` to `peer` while the data plane is away: the install is
/// refused as the daemon refuses it with no agent connected, the ChannelBind succeeds and
/// user space relays the channel.
fn bind_in_user_space(h: &mut Harness, client: &mut Client, n: u16, peer: &str) -> ChannelBinding {
    bind_refused(h, client, (n, peer), OffloadError::Unavailable)
}

/// Binds channel `n` of `client` to `peer`, and the install fails with `error`: the
/// ChannelBind succeeds and user space relays the channel. The binding is taken out of the
/// kernel again (a removal) unless the daemon could not send the install at all.
fn bind_refused(
    h: &mut Harness,
    client: &mut Client,
    (n, peer): (u16, &str),
    error: OffloadError,
) -> ChannelBinding {
    assert!(h.bind(client, n, peer).is_empty(), "held for the install");
    let Some(Command::InstallChannel { binding, .. }) = h.take_commands().pop() else {
        panic!("no install");
    };
    let sent = error != OffloadError::Unavailable;
    h.server.channel_installed(h.now, &binding, Err(error));
    let out = h.drain();
    assert!(Resp(out[0].payload().to_vec()).is_success());
    let removal = sent.then_some(Command::RemoveChannel { binding });
    assert_eq!(h.take_commands(), Vec::from_iter(removal));
    binding
}

/// A minute on, `client` refreshes `binding` (a ChannelBind to its peer), which installs it
/// with the permission's new expiry.
fn refresh_installs(h: &mut Harness, client: &mut Client, binding: ChannelBinding) {
    h.advance(Duration::from_secs(60));
    let out = h.bind(client, binding.channel.value(), &binding.peer.0.to_string());
    assert!(Resp(out[0].payload().to_vec()).is_success());
    assert_eq!(
        installed(&h.take_commands()),
        vec![(binding, h.now + PERMISSION_LIFETIME)]
    );
}

/// The bindings `commands` install, with their expiries, sorted.
fn installed(commands: &[Command]) -> Vec<(ChannelBinding, Instant)> {
    let mut installs: Vec<_> = commands
        .iter()
        .filter_map(|command| match command {
            Command::InstallChannel {
                binding, expires, ..
            } => Some((*binding, *expires)),
            _ => None,
        })
        .collect();
    installs.sort_by_key(|(binding, _)| binding.channel);
    installs
}

#[test]
fn channels_bound_while_the_data_plane_was_away_go_to_it_when_it_comes_back() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    let relay = h.allocate(&mut c);
    h.take_commands();
    let bound_at = h.now;
    let first = bind_in_user_space(&mut h, &mut c, 0x4001, PEER);
    let second = bind_in_user_space(&mut h, &mut c, 0x4002, PEER2);
    // A TCP client's channel is never the kernel's.
    let mut tcp = Client::new("192.0.2.9:7000", "bob", "bob-pw");
    tcp.transport = Transport::Tcp;
    h.allocate(&mut tcp);
    assert!(h.bind_acked(&mut tcp, 0x4000, PEER).is_success());
    h.take_commands();
    assert_eq!(h.server.channel_bindings().count(), 0);

    h.advance(Duration::from_secs(10));
    h.server.set_data_plane_connected(h.now, true);
    // Each with the expiry of its permission, the earliest of its three.
    let expires = bound_at + PERMISSION_LIFETIME;
    assert_eq!(
        installed(&h.take_commands()),
        vec![(first, expires), (second, expires)]
    );
    assert_eq!(h.server.channel_bindings().count(), 2, "in the next Sync");
    for binding in [first, second] {
        h.server.channel_installed(h.now, &binding, Ok(()));
    }
    assert_eq!(h.server.stats().offload_installed, 2);
    // Still relayed in user space too, for what the kernel passes up.
    let out = h.peer_send(relay, PEER, b"x");
    assert_eq!(out[0].payload(), &channel_data(0x4001, b"x")[..]);

    // The link lost and back: the kernel holds them, the Sync carries them, nothing more.
    h.server.set_data_plane_connected(h.now, false);
    h.server.set_data_plane_connected(h.now, true);
    assert_eq!(installed(&h.take_commands()), vec![]);
}

#[test]
fn a_channel_whose_permission_lapsed_stays_out_of_the_data_plane() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.take_commands();
    bind_in_user_space(&mut h, &mut c, 0x4001, PEER);
    // RFC 8656 §9: the permission lasts 300 s, the channel 600 s; the data plane checks no
    // permission, so the channel must not reach it without one.
    h.advance(PERMISSION_LIFETIME + Duration::from_secs(1));
    h.take_commands();
    h.server.set_data_plane_connected(h.now, true);
    assert_eq!(installed(&h.take_commands()), vec![]);
    assert_eq!(h.server.channel_bindings().count(), 0);
}

#[test]
fn a_refresh_offers_a_refused_channel_again_while_the_data_plane_is_up() {
    let mut h = Harness::new();
    h.server.set_data_plane_connected(h.now, true);
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.take_commands();
    // Refused (a full map, say) and removed: relayed in user space.
    let full = OffloadError::Rejected("binding map full".to_owned());
    let binding = bind_refused(&mut h, &mut c, (0x4001, PEER), full);

    // The client's refresh is answered at once and offers the channel again.
    refresh_installs(&mut h, &mut c, binding);
    h.server.channel_installed(h.now, &binding, Ok(()));
    assert_eq!(h.server.channel_bindings().count(), 1);

    // A refresh of what the kernel holds moves its expiry, as before.
    refresh_installs(&mut h, &mut c, binding);
}

#[test]
fn no_offer_while_the_link_is_down_or_the_last_removal_is_unanswered() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.take_commands();
    let binding = bind_in_user_space(&mut h, &mut c, 0x4001, PEER);

    // Refreshed while the link is down: the channel stays in user space.
    h.advance(Duration::from_secs(60));
    assert!(Resp(h.bind(&mut c, 0x4001, PEER)[0].payload().to_vec()).is_success());
    assert_eq!(installed(&h.take_commands()), vec![]);

    // Up, offered, refused, and its removal not answered yet: the kernel's figures of its
    // last life are still to come, so neither a refresh nor a reconnect offers it.
    h.answer_removals = false;
    h.server.set_data_plane_connected(h.now, true);
    assert_eq!(
        installed(&h.take_commands()),
        vec![(binding, h.now + PERMISSION_LIFETIME)]
    );
    let refused = OffloadError::Rejected("binding map full".to_owned());
    h.server.channel_installed(h.now, &binding, Err(refused));
    assert_eq!(h.take_commands(), vec![Command::RemoveChannel { binding }]);
    h.advance(Duration::from_secs(60));
    h.bind(&mut c, 0x4001, PEER);
    h.server.set_data_plane_connected(h.now, true);
    assert_eq!(installed(&h.take_commands()), vec![]);

    // Answered: the next refresh offers it.
    h.server
        .channel_removed(h.now, &binding, Some(crate::Usage::default()));
    refresh_installs(&mut h, &mut c, binding);
}

#[test]
fn a_user_past_its_share_of_the_data_plane_is_not_offered_more() {
    let mut h = Harness::with(|config| config.user_kernel_bindings = 1);
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.take_commands();
    assert!(h.bind_acked(&mut c, 0x4001, PEER).is_success());
    // The second channel is past alice's share: answered at once, relayed in user space.
    assert!(Resp(h.bind(&mut c, 0x4002, PEER2)[0].payload().to_vec()).is_success());
    h.take_commands();
    assert_eq!(h.server.stats().kernel_share_exceeded, 1);

    h.server.set_data_plane_connected(h.now, true);
    h.advance(Duration::from_secs(60));
    h.bind(&mut c, 0x4002, PEER2);
    let offered: Vec<u16> = installed(&h.take_commands())
        .iter()
        .map(|(binding, _)| binding.channel.value())
        .collect();
    assert!(!offered.contains(&0x4002), "offered: {offered:x?}");
    // Not counted again: the counter counts channels turned away, not refreshes.
    assert_eq!(h.server.stats().kernel_share_exceeded, 1);
}

#[test]
fn a_channel_the_kernel_never_held_leaves_its_figures_final() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    bind_in_user_space(&mut h, &mut c, 0x4001, PEER);
    // Deleted (Refresh with lifetime 0): no removal to wait for, and none whose figures
    // could be missing.
    let req = c.request(METHOD_REFRESH, |b| {
        b.raw(ATTR_LIFETIME, &[0; 4]);
    });
    assert!(h.call(&c, &req).is_success());
    let commands = h.take_commands();
    assert!(
        !commands
            .iter()
            .any(|command| matches!(command, Command::RemoveChannel { .. })),
        "{commands:?}"
    );
    let stop = h.records.last().unwrap();
    assert_eq!(
        (stop.record, stop.kernel_final),
        (crate::RecordKind::Stop, Some(true))
    );

    // Once the kernel answered an install, a later one that could not be sent still takes
    // the binding out (the kernel holds the earlier one), and the allocation waits for it.
    let mut d = Client::new("192.0.2.2:5000", "alice", "alice-pw");
    h.allocate(&mut d);
    assert!(h.bind_acked(&mut d, 0x4001, PEER).is_success());
    h.advance(Duration::from_secs(60));
    h.bind(&mut d, 0x4001, PEER);
    let binding = installed(&h.take_commands())[0].0;
    h.server
        .channel_installed(h.now, &binding, Err(OffloadError::Unavailable));
    assert_eq!(h.take_commands(), vec![Command::RemoveChannel { binding }]);
}

#[test]
fn an_install_whose_answer_was_lost_is_taken_out_again() {
    let mut h = Harness::new();
    let mut c = Client::alice();
    h.allocate(&mut c);
    h.take_commands();
    // Sent, and the link broke before the answer: the agent may have applied it.
    let lost = OffloadError::Lost("connection reset".to_owned());
    bind_refused(&mut h, &mut c, (0x4001, PEER), lost);
}
