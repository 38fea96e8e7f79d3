//! The blocking UDP STUN/TURN client and the codec of [`tests_stun`], shared with
//! turn-control's own integration tests through [`tests_harness::stun`] (re-exported here).

pub use tests_harness::stun::*;
