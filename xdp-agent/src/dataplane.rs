//! The kernel seam: loading the XDP object through its skeleton, attaching it
//! to interfaces, and reading and writing its maps. Everything else in the
//! agent talks to the kernel through [`DataPlane`].

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use anyhow::{Context, bail};
use bpf_common::{Counter, DataPlaneConfig, PeerTarget, Pod, REASON_COUNT, Reason, Verdict};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, OpenObject, PrintLevel};
use tracing::{debug, info, warn};

use crate::binding::{Binding, MapKey};

use relay_skel as skel;

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

/// The mode an attachment ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// In the driver, before any socket buffer exists.
    Native,
    /// After the stack built a socket buffer: works everywhere, slower.
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
        })
    }
}

/// Why a map operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The binding map has no room left; nothing was evicted.
    #[error("the binding map is full ({capacity} entries)")]
    Full {
        /// The map's capacity.
        capacity: u32,
    },
    /// The kernel refused the operation.
    #[error("map operation failed: {0}")]
    Kernel(#[from] libbpf_rs::Error),
}

/// An XDP program attached to an interface through a BPF link: closing the
/// link's descriptor detaches the program.
#[derive(Debug)]
pub struct XdpLink {
    /// The interface's name.
    pub interface: String,
    /// The mode the kernel attached in.
    pub mode: AttachedMode,
    _fd: OwnedFd,
}

/// The loaded program and handles on its maps.
#[derive(Debug)]
pub struct DataPlane {
    program_fd: OwnedFd,
    config: MapHandle,
    client_v4: MapHandle,
    client_v6: MapHandle,
    peer_v4: MapHandle,
    peer_v6: MapHandle,
    stats: MapHandle,
    /// Serialises multi-entry writes so that a batch is all-or-nothing.
    write_lock: Mutex<()>,
}

impl DataPlane {
    /// Opens and loads the embedded object. A program the verifier rejects
    /// fails here, after libbpf printed the verifier's log through `tracing`.
    pub fn load() -> anyhow::Result<Self> {
        route_libbpf_output_to_tracing();
        // The skeleton borrows its object storage for as long as it lives;
        // the agent loads once per process, so the storage lives as long.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let open = skel::RelaySkelBuilder::default()
            .open(storage)
            .context("cannot open the embedded XDP object")?;
        let skel = open
            .load()
            .context("the kernel refused the XDP program (the verifier's log is above)")?;
        let handle = |map: &libbpf_rs::MapMut<'_>, name: &str| {
            MapHandle::try_from(map).with_context(|| format!("cannot duplicate the {name} map"))
        };
        let program_fd = skel
            .progs
            .xdp_relay
            .as_fd()
            .try_clone_to_owned()
            .context("cannot duplicate the program descriptor")?;
        Ok(Self {
            program_fd,
            config: handle(&skel.maps.CONFIG, "CONFIG")?,
            client_v4: handle(&skel.maps.CLIENT_V4, "CLIENT_V4")?,
            client_v6: handle(&skel.maps.CLIENT_V6, "CLIENT_V6")?,
            peer_v4: handle(&skel.maps.PEER_V4, "PEER_V4")?,
            peer_v6: handle(&skel.maps.PEER_V6, "PEER_V6")?,
            stats: handle(&skel.maps.STATS, "STATS")?,
            write_lock: Mutex::new(()),
        })
    }

    /// Attaches the program to `interface` in `mode`.
    pub fn attach(&self, interface: &str, mode: XdpMode) -> anyhow::Result<XdpLink> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface named {interface}"))?;
        let (fd, mode) = match mode {
            XdpMode::Native => (
                self.link_create(ifindex, XDP_FLAGS_DRV_MODE)?,
                AttachedMode::Native,
            ),
            XdpMode::Generic => (
                self.link_create(ifindex, XDP_FLAGS_SKB_MODE)?,
                AttachedMode::Generic,
            ),
            XdpMode::Auto => match self.link_create(ifindex, XDP_FLAGS_DRV_MODE) {
                Ok(fd) => (fd, AttachedMode::Native),
                Err(error) => {
                    warn!(interface, error = %format!("{error:#}"), "native XDP unavailable, falling back to generic mode");
                    (
                        self.link_create(ifindex, XDP_FLAGS_SKB_MODE)?,
                        AttachedMode::Generic,
                    )
                }
            },
        };
        info!(interface, %mode, "XDP program attached");
        Ok(XdpLink {
            interface: interface.to_owned(),
            mode,
            _fd: fd,
        })
    }

    fn link_create(&self, ifindex: u32, flags: u32) -> anyhow::Result<OwnedFd> {
        let opts = libbpf_rs::libbpf_sys::bpf_link_create_opts {
            sz: size_of::<libbpf_rs::libbpf_sys::bpf_link_create_opts>() as _,
            flags,
            ..Default::default()
        };
        // SAFETY: plain syscall wrapper; `opts` is a valid, sized options struct.
        let fd = unsafe {
            libbpf_rs::libbpf_sys::bpf_link_create(
                self.program_fd.as_raw_fd(),
                ifindex as i32,
                libbpf_rs::libbpf_sys::BPF_XDP,
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

    /// Writes the data-plane configuration.
    pub fn set_config(&self, config: &DataPlaneConfig) -> anyhow::Result<()> {
        self.config
            .update(&0u32.to_ne_bytes(), config.as_bytes(), MapFlags::ANY)
            .context("cannot write the data-plane configuration")
    }

    /// Installs bindings, both directions of each, all or none: on failure
    /// every entry already written is restored to what it was. Returns how
    /// many bindings the maps hold after.
    pub fn add(&self, bindings: &[Binding]) -> Result<u64, MapError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut undo: Vec<(&MapHandle, MapKey, Option<Vec<u8>>)> = Vec::new();
        let mut write = |key: MapKey, value: &[u8]| -> Result<(), MapError> {
            let map = self.map(&key);
            let previous = map.lookup(key.bytes(), MapFlags::ANY)?;
            map.update(key.bytes(), value, MapFlags::ANY)
                .map_err(|error| match error.kind() {
                    libbpf_rs::ErrorKind::TooBig => MapError::Full {
                        capacity: map.max_entries(),
                    },
                    _ => MapError::Kernel(error),
                })?;
            undo.push((map, key, previous));
            Ok(())
        };
        let result = bindings.iter().try_for_each(|binding| {
            let (client_key, peer_target) = binding.client_entry();
            let (peer_key, client_target) = binding.peer_entry();
            write(client_key, peer_target.as_bytes())?;
            write(peer_key, client_target.as_bytes())?;
            debug!(%binding, "binding installed");
            Ok(())
        });
        if let Err(error) = result {
            for (map, key, previous) in undo.into_iter().rev() {
                let _ = match previous {
                    Some(value) => map.update(key.bytes(), &value, MapFlags::ANY),
                    None => map.delete(key.bytes()),
                };
            }
            return Err(error);
        }
        Ok(self.installed())
    }

    /// Removes bindings, both directions; returns how many were present.
    pub fn remove(&self, bindings: &[Binding]) -> Result<u64, MapError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut removed = 0;
        for binding in bindings {
            let (client_key, _) = binding.client_entry();
            let (peer_key, _) = binding.peer_entry();
            let mut present = false;
            for key in [client_key, peer_key] {
                match self.map(&key).delete(key.bytes()) {
                    Ok(()) => present = true,
                    Err(error) if error.kind() == libbpf_rs::ErrorKind::NotFound => {}
                    Err(error) => return Err(MapError::Kernel(error)),
                }
            }
            if present {
                removed += 1;
                debug!(%binding, "binding removed");
            }
        }
        Ok(removed)
    }

    /// Every installed binding, read from the client-side maps.
    pub fn bindings(&self) -> Result<Vec<Binding>, MapError> {
        let mut bindings = Vec::new();
        for map in [&self.client_v4, &self.client_v6] {
            for key in map.keys() {
                // A binding removed between `keys` and `lookup` is simply not listed.
                let Some(value) = map.lookup(&key, MapFlags::ANY)? else {
                    continue;
                };
                if let Some(target) = PeerTarget::from_bytes(&value)
                    && let Some(binding) = Binding::from_client_entry(&key, &target)
                {
                    bindings.push(binding);
                }
            }
        }
        bindings.sort();
        Ok(bindings)
    }

    /// How many bindings the client-side maps hold.
    pub fn installed(&self) -> u64 {
        (self.client_v4.keys().count() + self.client_v6.keys().count()) as u64
    }

    fn map(&self, key: &MapKey) -> &MapHandle {
        match key {
            MapKey::ClientV4(_) => &self.client_v4,
            MapKey::ClientV6(_) => &self.client_v6,
            MapKey::PeerV4(_) => &self.peer_v4,
            MapKey::PeerV6(_) => &self.peer_v6,
        }
    }

    /// The per-reason counters, summed over CPUs, in `Reason` order.
    pub fn counters(&self) -> Result<Vec<(Reason, Counter)>, MapError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                let index = reason as u32;
                debug_assert!(index < REASON_COUNT);
                Ok((reason, sum_per_cpu(&self.stats, index)?))
            })
            .collect()
    }

    /// Relayed traffic of all paths, summed over CPUs.
    pub fn relayed(&self) -> Result<Counter, MapError> {
        Ok(self
            .counters()?
            .into_iter()
            .filter(|(reason, _)| reason.verdict() == Verdict::Tx)
            .fold(Counter::default(), |sum, (_, counter)| Counter {
                packets: sum.packets + counter.packets,
                bytes: sum.bytes + counter.bytes,
            }))
    }
}

fn sum_per_cpu(map: &MapHandle, index: u32) -> Result<Counter, MapError> {
    let per_cpu = map.lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)?;
    Ok(per_cpu
        .unwrap_or_default()
        .iter()
        .filter_map(|raw| Counter::from_ne_bytes(raw))
        .fold(Counter::default(), |sum, cpu| Counter {
            packets: sum.packets + cpu.packets,
            bytes: sum.bytes + cpu.bytes,
        }))
}

/// `XDP_FLAGS_SKB_MODE` from `linux/if_link.h`.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE` from `linux/if_link.h`.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// libbpf reports through a print callback; the verifier's log arrives there
/// at WARN level when a program is rejected. Never silence it.
fn route_libbpf_output_to_tracing() {
    fn print(level: PrintLevel, message: String) {
        let message = message.trim_end();
        match level {
            PrintLevel::Warn => warn!(target: "libbpf", "{message}"),
            PrintLevel::Info => info!(target: "libbpf", "{message}"),
            PrintLevel::Debug => debug!(target: "libbpf", "{message}"),
        }
    }
    libbpf_rs::set_print(Some((PrintLevel::Debug, print)));
}
