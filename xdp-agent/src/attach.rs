//! Attaching the program to interfaces through BPF links pinned in bpffs,
//! so that an agent restart or upgrade swaps the program in place (the link
//! is updated atomically) and offloaded traffic never stops.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use libbpf_rs::libbpf_sys;
use tracing::{info, warn};

/// How to attach the program to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpMode {
    /// Driver (native) mode; generic mode as a logged fallback.
    Auto,
    /// Driver (native) mode only.
    Native,
    /// Generic (skb) mode only.
    Generic,
}

/// The mode an attachment is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// After the stack built a socket buffer: works everywhere, slower.
    Generic,
}

impl fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// The program attached to one interface through a pinned BPF link.
#[derive(Debug)]
pub struct Attachment {
    /// The interface's name.
    pub interface: String,
    /// The mode the program runs in.
    pub mode: AttachedMode,
    /// Whether the link was adopted from an earlier run (and updated to this
    /// run's program) rather than created.
    pub adopted: bool,
    pin: PathBuf,
    _link: OwnedFd,
}

impl Attachment {
    /// Attaches `program` to `interface`: updates the link pinned for it in
    /// `pin_dir` if an earlier run left one on the same interface, else
    /// creates one in `mode` and pins it.
    pub fn attach(
        program: BorrowedFd<'_>,
        interface: &str,
        mode: XdpMode,
        pin_dir: &Path,
    ) -> anyhow::Result<Self> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface named {interface}"))?;
        let pin = pin_dir.join(format!("link-{interface}"));
        if pin.exists() {
            match adopt(program, &pin, ifindex) {
                Ok(link) => {
                    let mode = attached_mode(program, ifindex)?;
                    info!(interface, %mode, "XDP program updated in the pinned link, traffic uninterrupted");
                    return Ok(Self {
                        interface: interface.to_owned(),
                        mode,
                        adopted: true,
                        pin,
                        _link: link,
                    });
                }
                Err(error) => {
                    warn!(interface, error = %format!("{error:#}"), "pinned link unusable, attaching anew");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let (link, mode) = match mode {
            XdpMode::Native => (
                link_create(program, ifindex, XDP_FLAGS_DRV_MODE)?,
                AttachedMode::Native,
            ),
            XdpMode::Generic => (
                link_create(program, ifindex, XDP_FLAGS_SKB_MODE)?,
                AttachedMode::Generic,
            ),
            XdpMode::Auto => match link_create(program, ifindex, XDP_FLAGS_DRV_MODE) {
                Ok(link) => (link, AttachedMode::Native),
                Err(error) => {
                    warn!(interface, error = %format!("{error:#}"), "native XDP unavailable, falling back to generic mode");
                    (
                        link_create(program, ifindex, XDP_FLAGS_SKB_MODE)?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        pin_object(&link, &pin)?;
        info!(interface, %mode, "XDP program attached");
        Ok(Self {
            interface: interface.to_owned(),
            mode,
            adopted: false,
            pin,
            _link: link,
        })
    }

    /// Leaves the program attached after this process exits (the pin holds it).
    pub fn keep(self) {
        info!(
            interface = self.interface,
            "XDP program left attached (pinned)"
        );
    }

    /// Detaches: removes the pin; the link goes when its last descriptor closes.
    pub fn detach(self) {
        if let Err(error) = std::fs::remove_file(&self.pin) {
            warn!(pin = %self.pin.display(), %error, "cannot remove the link's pin");
        }
        info!(interface = self.interface, mode = %self.mode, "XDP program detached");
    }
}

/// Removes every link pinned in `pin_dir` (for `xdp-agent detach`).
pub fn unpin_links(pin_dir: &Path) -> anyhow::Result<usize> {
    let mut removed = 0;
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", pin_dir.display()));
        }
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().as_bytes().starts_with(b"link-") {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Checks with the kernel that `program` runs on `interface` now, whatever
/// this agent attached at start: an operator, another tool or the
/// interface's removal may have detached it since (`BPF_LINK_DETACH`, say).
/// The error is one line naming the interface.
pub fn verify_attached(program: BorrowedFd<'_>, interface: &str) -> anyhow::Result<()> {
    let ifindex = nix::net::if_::if_nametoindex(interface)
        .with_context(|| format!("{interface}: no such interface"))?;
    let query = libbpf_rs::Xdp::new(program)
        .query(ifindex as i32, libbpf_rs::XdpFlags::NONE)
        .with_context(|| format!("{interface}: cannot query its XDP program"))?;
    let id = program_id(program)?;
    let running = [
        query.prog_id,
        query.drv_prog_id,
        query.skb_prog_id,
        query.hw_prog_id,
    ];
    if !running.contains(&id) {
        bail!("{interface}: the XDP program is not attached");
    }
    Ok(())
}

/// The kernel's id of `program`.
fn program_id(program: BorrowedFd<'_>) -> anyhow::Result<u32> {
    let mut info = libbpf_sys::bpf_prog_info::default();
    let mut len = size_of::<libbpf_sys::bpf_prog_info>() as u32;
    // SAFETY: `info` and `len` describe a valid, writable bpf_prog_info.
    let ret =
        unsafe { libbpf_sys::bpf_prog_get_info_by_fd(program.as_raw_fd(), &mut info, &mut len) };
    if ret != 0 {
        bail!(
            "cannot inspect the XDP program: {}",
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    Ok(info.id)
}

/// `XDP_FLAGS_SKB_MODE` from `linux/if_link.h`.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE` from `linux/if_link.h`.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `XDP_ATTACHED_SKB` from `linux/if_link.h`.
const XDP_ATTACHED_SKB: u8 = 2;

fn link_create(program: BorrowedFd<'_>, ifindex: u32, flags: u32) -> anyhow::Result<OwnedFd> {
    let opts = libbpf_sys::bpf_link_create_opts {
        sz: size_of::<libbpf_sys::bpf_link_create_opts>() as _,
        flags,
        ..Default::default()
    };
    // SAFETY: a syscall wrapper; `opts` is a valid, sized options struct.
    let fd = unsafe {
        libbpf_sys::bpf_link_create(
            program.as_raw_fd(),
            ifindex as i32,
            libbpf_sys::BPF_XDP,
            &opts,
        )
    };
    if fd < 0 {
        let mode = if flags == XDP_FLAGS_DRV_MODE {
            "native"
        } else {
            "generic"
        };
        bail!(
            "cannot attach in {mode} mode to ifindex {ifindex}: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the link pinned at `pin`, checks it is an XDP link on `ifindex`,
/// and points it at `program` (atomically: no packet sees no program).
fn adopt(program: BorrowedFd<'_>, pin: &Path, ifindex: u32) -> anyhow::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // SAFETY: a syscall wrapper reading a NUL-terminated path.
    let fd = unsafe { libbpf_sys::bpf_obj_get(path.as_ptr()) };
    if fd < 0 {
        bail!(
            "cannot open {}: {}",
            pin.display(),
            std::io::Error::from_raw_os_error(-fd)
        );
    }
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let link = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = libbpf_sys::bpf_link_info::default();
    let mut len = size_of::<libbpf_sys::bpf_link_info>() as u32;
    // SAFETY: `info` and `len` describe a valid, writable bpf_link_info.
    let ret = unsafe { libbpf_sys::bpf_link_get_info_by_fd(link.as_raw_fd(), &mut info, &mut len) };
    if ret != 0 {
        bail!(
            "cannot inspect {}: {}",
            pin.display(),
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    if info.type_ != libbpf_sys::BPF_LINK_TYPE_XDP {
        bail!("{} is not an XDP link", pin.display());
    }
    // SAFETY: the kernel filled the XDP member for an XDP link.
    let linked_ifindex = unsafe { info.__bindgen_anon_1.xdp.ifindex };
    if linked_ifindex != ifindex {
        bail!(
            "{} belongs to ifindex {linked_ifindex}, not {ifindex} (interface recreated?)",
            pin.display()
        );
    }
    // SAFETY: a syscall wrapper; null options mean "replace whatever runs".
    let ret = unsafe {
        libbpf_sys::bpf_link_update(link.as_raw_fd(), program.as_raw_fd(), std::ptr::null())
    };
    if ret != 0 {
        bail!(
            "cannot update {}: {}",
            pin.display(),
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    Ok(link)
}

fn pin_object(fd: &OwnedFd, pin: &Path) -> anyhow::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())?;
    // SAFETY: a syscall wrapper reading a NUL-terminated path.
    let ret = unsafe { libbpf_sys::bpf_obj_pin(fd.as_raw_fd(), path.as_ptr()) };
    if ret != 0 {
        bail!(
            "cannot pin at {}: {}",
            pin.display(),
            std::io::Error::from_raw_os_error(-ret)
        );
    }
    Ok(())
}

/// The mode the program attached to `ifindex` runs in.
fn attached_mode(program: BorrowedFd<'_>, ifindex: u32) -> anyhow::Result<AttachedMode> {
    let query = libbpf_rs::Xdp::new(program)
        .query(ifindex as i32, libbpf_rs::XdpFlags::NONE)
        .with_context(|| format!("cannot query XDP on ifindex {ifindex}"))?;
    Ok(if query.attach_mode == XDP_ATTACHED_SKB {
        AttachedMode::Generic
    } else {
        AttachedMode::Native
    })
}
