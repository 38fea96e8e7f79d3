//! The one capability turn-control may be given: CAP_NET_BIND_SERVICE, for listeners on ports
//! below 1024 (TURN over TLS on 443). systemd grants it as an ambient capability
//! (deploy/systemd/turn-control.service.d/port-443.conf); the daemon binds every listener at
//! start and then gives the capability up for good, so it runs its event loops, parses
//! clients' messages and reloads its certificate with no capability at all. Relay ports are
//! above 1023 and need none.

use std::io;

/// `CAP_NET_BIND_SERVICE` (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit capability sets in two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Drops CAP_NET_BIND_SERVICE from every set of the process if it came as an ambient
/// capability (a service manager's grant for binding a low port); whether it did. A process
/// that was not given it that way (root in a shell, a container with its own policy) is left
/// as it is: its capabilities are its operator's business.
pub fn drop_bind_capability() -> io::Result<bool> {
    let cap = libc::c_ulong::from(CAP_NET_BIND_SERVICE);
    // SAFETY: prctl(PR_CAP_AMBIENT, ...) takes integers only.
    let ambient =
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) };
    if ambient != 1 {
        return Ok(false);
    }
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_LOWER, cap, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData words (version 3) into `data` and may rewrite the
    // header's version; both are valid, exclusively borrowed and laid out as the kernel's.
    if unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let bit = !(1u32 << CAP_NET_BIND_SERVICE);
    data[0].effective &= bit;
    data[0].permitted &= bit;
    data[0].inheritable &= bit;
    // SAFETY: capset reads the header and two CapData words, all valid.
    if unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
