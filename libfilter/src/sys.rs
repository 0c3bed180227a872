//! The syscall backend: the only module allowed `unsafe`.
//!
//! `openat2` (confined path resolution), `name_to_handle_at` /
//! `open_by_handle_at` (kernel file handles that survive renames), and opening
//! the LMDB environment (heed marks it `unsafe` because the same file must not
//! be opened twice in one process with different options). Everything returns
//! `OwnedFd` and `std::io::Error`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::model::KernelHandle;

/// `RESOLVE_NO_MAGICLINKS` from `<linux/openat2.h>`.
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
/// `RESOLVE_NO_SYMLINKS` from `<linux/openat2.h>`.
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
/// `RESOLVE_BENEATH` from `<linux/openat2.h>`.
const RESOLVE_BENEATH: u64 = 0x08;
const RESOLVE_NO_XDEV: u64 = 0x01;
/// `MAX_HANDLE_SZ` from `<linux/exportfs.h>`.
const MAX_HANDLE_SZ: usize = 128;
const MAX_HANDLE_SZ_U32: u32 = 128;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` relative to `dir` with `openat2`, refusing any resolution that
/// leaves `dir` (`..`, absolute symlinks, symlinks pointing out) with `EXDEV`,
/// and any magic link (`/proc/self/fd/N` style) with `ELOOP`.
pub fn openat2_beneath(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    openat2_resolving(dir, path, flags, mode, 0)
}

/// [`openat2_beneath`] that also refuses any symbolic link on the way
/// (`RESOLVE_NO_SYMLINKS`: `ELOOP`), the last component's included — so a
/// success says the path names its file without a link.
pub fn openat2_beneath_no_links(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    openat2_resolving(dir, path, flags, mode, RESOLVE_NO_SYMLINKS)
}

fn openat2_resolving(
    dir: BorrowedFd<'_>,
    path: &str,
    flags: i32,
    mode: u32,
    more: u64,
) -> io::Result<OwnedFd> {
    let cpath = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        // The mode counts for O_CREAT and for O_TMPFILE (whose anonymous
        // file would otherwise be born with mode 0000).
        mode: if flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
            u64::from(mode)
        } else {
            0
        },
        // Not into another filesystem mounted inside the export either:
        // fanotify marks the export's filesystem (or mount), not those.
        resolve: RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV | more,
    };
    // With O_NONBLOCK, EAGAIN also means the open would wait for a local
    // process's kernel lease to be broken: after a few tries (a rename race
    // does not last), it is returned.
    let mut tries_left = if flags & libc::O_NONBLOCK != 0 {
        16
    } else {
        u32::MAX
    };
    loop {
        // SAFETY: `cpath` is a NUL-terminated string and `how` a properly
        // initialised `struct open_how` that both outlive the call; the size
        // passed is the size of that struct.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                cpath.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            let fd = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: the kernel just returned this descriptor to us; nothing
            // else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        // openat2 returns EAGAIN when a concurrent rename raced the
        // resolution; retrying is what the man page prescribes.
        if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
        if e.raw_os_error() == Some(libc::EAGAIN) {
            tries_left = tries_left.saturating_sub(1);
            if tries_left == 0 {
                return Err(e);
            }
        }
    }
}

#[repr(C)]
struct FileHandleBuf {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the file's kernel handle and
/// the id of the mount it lives on.
fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(KernelHandle, i32)> {
    let mut buf = FileHandleBuf {
        handle_bytes: MAX_HANDLE_SZ_U32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `buf` is a `struct file_handle` with room for MAX_HANDLE_SZ
    // bytes as `handle_bytes` says; the empty path is NUL-terminated; both
    // out-pointers are valid for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut buf as *mut FileHandleBuf,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let n = usize::try_from(buf.handle_bytes)
        .unwrap_or(usize::MAX)
        .min(MAX_HANDLE_SZ);
    let handle = KernelHandle {
        handle_type: buf.handle_type,
        bytes: buf.f_handle.get(..n).unwrap_or_default().to_vec(),
    };
    Ok((handle, mount_id))
}

/// The kernel file handle of the file `fd` refers to (`name_to_handle_at` with
/// `AT_EMPTY_PATH`).
pub fn file_handle_of(fd: BorrowedFd<'_>) -> io::Result<KernelHandle> {
    name_to_handle(fd).map(|(h, _)| h)
}

/// The mount id of the mount `fd` lives on: a directory is a mount point
/// exactly when its id differs from its parent's.
pub fn mount_id_of(fd: BorrowedFd<'_>) -> io::Result<i32> {
    name_to_handle(fd).map(|(_, m)| m)
}

/// Reopens a file by its kernel handle on the filesystem `mount_fd` lives on
/// (needs `CAP_DAC_READ_SEARCH`). A file renamed since is still found; a
/// deleted one gives `ESTALE`.
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    h: &KernelHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    if h.bytes.len() > MAX_HANDLE_SZ {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = FileHandleBuf {
        handle_bytes: u32::try_from(h.bytes.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        handle_type: h.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    if let Some(dst) = buf.f_handle.get_mut(..h.bytes.len()) {
        dst.copy_from_slice(&h.bytes);
    }
    // SAFETY: `buf` is a valid `struct file_handle` whose `handle_bytes` does
    // not exceed its buffer; it outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut buf as *mut FileHandleBuf,
            flags | libc::O_CLOEXEC,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens an LMDB environment with the given named-database count, map size
/// and flags.
pub fn open_lmdb(
    path: &Path,
    max_dbs: u32,
    map_size: usize,
    flags: heed::EnvFlags,
) -> heed::Result<heed::Env> {
    let mut opts = heed::EnvOpenOptions::new();
    opts.max_dbs(max_dbs).map_size(map_size).max_readers(256);
    // SAFETY: heed requires that an environment is not opened twice in one
    // process and that flags be consistent; the store opens each state dir
    // once per process (filterd holds an exclusive lock on the state dir,
    // filterctl opens it once per run). `NO_LOCK` leaves concurrency to the
    // caller: only a read-only open of a store no process has open uses it
    // (`Store::open_read_only`).
    unsafe {
        opts.flags(flags);
        opts.open(path)
    }
}

/// Drops this process's page-table entries of every read-only shared
/// mapping of the file `path` (LMDB's map of `data.mdb`), returning the
/// bytes of address space covered. The pages stay in the kernel's page
/// cache and are mapped again on the next read that touches them, so only
/// the resident set shrinks: a scan of the whole file (restart recovery)
/// leaves every page it touched — and, through fault-around, its
/// neighbours — counted in the process's RSS until then.
///
/// The caller must keep the mapping from being replaced meanwhile (the
/// store holds its transaction gate, which a map resize needs exclusively).
pub(crate) fn release_file_pages(path: &Path) -> io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path)?;
    let (ino, major, minor) = (md.ino(), libc::major(md.dev()), libc::minor(md.dev()));
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let hex = |s: &str| usize::from_str_radix(s, 16).ok();
    let mut released = 0;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_offset), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let same_file = inode.parse::<u64>().ok() == Some(ino)
            && dev.split_once(':').is_some_and(|(ma, mi)| {
                u32::from_str_radix(ma, 16).ok() == Some(major)
                    && u32::from_str_radix(mi, 16).ok() == Some(minor)
            });
        // Read-only and shared only: a private or writable mapping's pages
        // may hold what the file does not.
        if !same_file || !perms.starts_with("r-") || !perms.ends_with('s') {
            continue;
        }
        let Some((start, end)) = range
            .split_once('-')
            .and_then(|(a, b)| Some((hex(a)?, hex(b)?)))
            .filter(|(a, b)| a < b)
        else {
            continue;
        };
        // SAFETY: [start, end) is a whole read-only MAP_SHARED mapping of a
        // file, as the kernel lists it, which the caller keeps in place.
        // MADV_DONTNEED on a shared file mapping only zaps page-table
        // entries: no content is lost (it is the file's, in the page
        // cache), and a later read — in any thread — faults it back in.
        let r =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        released += end - start;
    }
    Ok(released)
}

/// Sets an open environment's map size. `no_txns` is the exclusive guard
/// of the lock that every transaction on `env` holds shared while it is
/// open (the store's), proving none is open — LMDB's only condition.
pub(crate) fn resize_lmdb<T>(
    env: &heed::Env,
    new_size: usize,
    no_txns: &std::sync::RwLockWriteGuard<'_, T>,
) -> heed::Result<()> {
    let _ = no_txns;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096);
    let size = new_size.div_ceil(page) * page;
    // SAFETY: mdb_env_set_mapsize may be called on an open environment when
    // no transaction is active in this process; the caller holds the write
    // side of the store's transaction gate, which every transaction holds
    // shared for its whole life, and filterd opens the environment once.
    unsafe { env.resize(size) }
}

/// What [`recv_packet`] read.
#[derive(Debug)]
pub enum Packet {
    /// A whole packet of `len` bytes (in the caller's buffer) and the
    /// descriptors it carried.
    Data {
        /// Bytes read.
        len: usize,
        /// Descriptors received (`SCM_RIGHTS`), already close-on-exec.
        fds: Vec<OwnedFd>,
    },
    /// The packet did not fit the buffer (or carried too many descriptors);
    /// it was discarded, with its descriptors closed.
    Truncated,
    /// The peer closed the connection.
    Eof,
}

/// Receives one `SOCK_SEQPACKET` packet into `buf`, taking ownership of any
/// descriptors it carries. A packet larger than `buf` is reported as
/// [`Packet::Truncated`] — never partially delivered.
pub fn recv_packet(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Packet> {
    recv_packet_flags(sock, buf, nix::sys::socket::MsgFlags::empty())
}

/// Like [`recv_packet`] but never blocks: `Ok(None)` when nothing is queued.
pub fn recv_packet_nonblocking(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Packet>> {
    match recv_packet_flags(sock, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
        Ok(p) => Ok(Some(p)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

fn recv_packet_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    extra: nix::sys::socket::MsgFlags,
) -> io::Result<Packet> {
    let (len, flags, fds) = recv_raw(sock, buf, extra)?;
    Ok(classify(
        len,
        flags.intersects(
            nix::sys::socket::MsgFlags::MSG_TRUNC | nix::sys::socket::MsgFlags::MSG_CTRUNC,
        ),
        fds,
    ))
}

/// As [`recv_packet`] (or, with `nonblocking`, [`recv_packet_nonblocking`]),
/// except for a packet that arrived whole while some of its descriptors did
/// not (`MSG_CTRUNC` without `MSG_TRUNC`: this process's descriptor table
/// was full, or the packet carried more than the four there is room for;
/// the kernel closed what it did not install): that one is
/// [`Packet::Data`] with the descriptors that did arrive, owned (and
/// closed with it), and `true` beside it — its frame can still be read and
/// answered, where [`recv_packet`] calls it [`Packet::Truncated`].
pub fn recv_packet_cut(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> io::Result<Option<(Packet, bool)>> {
    use nix::sys::socket::MsgFlags;
    let extra = if nonblocking {
        MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::empty()
    };
    let (len, flags, fds) = match recv_raw(sock, buf, extra) {
        Ok(got) => got,
        Err(e) if nonblocking && e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) => return Err(e),
    };
    let cut = flags.contains(MsgFlags::MSG_CTRUNC) && !flags.contains(MsgFlags::MSG_TRUNC);
    Ok(Some((
        classify(len, flags.contains(MsgFlags::MSG_TRUNC), fds),
        cut,
    )))
}

/// Room for [`recv_packet`]'s ancillary data, in `u64` words (aligned for
/// `cmsghdr`): one `SCM_RIGHTS` message of four descriptors.
const RECV_CMSG_WORDS: usize = 4;

/// One `recvmsg`: the bytes read, the message flags, and the descriptors
/// it carried (owned) — those that did arrive when the message was cut
/// (`MSG_CTRUNC`) too. nix's `cmsgs()` gives none at all then, and the
/// descriptors the kernel had installed stayed open for good (review
/// rvunsafe); the control buffer is read by [`scm_rights`], as
/// [`PacketBatch`] reads its own.
fn recv_raw(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    extra: nix::sys::socket::MsgFlags,
) -> io::Result<(usize, nix::sys::socket::MsgFlags, Vec<OwnedFd>)> {
    use nix::sys::socket::MsgFlags;
    let mut control = [0u64; RECV_CMSG_WORDS];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is a plain C struct for which all-zero bytes
        // (null pointers, zero lengths) are a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: `hdr` points at one iovec over `buf` and at `control`,
        // both of which live (and are not otherwise borrowed) until the
        // call returns; the kernel writes only within the lengths given.
        let n = unsafe {
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut hdr,
                libc::MSG_CMSG_CLOEXEC | extra.bits(),
            )
        };
        if n >= 0 {
            // Every descriptor the kernel installed is owned from here on.
            let fds = scm_rights(&hdr);
            let len = usize::try_from(n).unwrap_or(0);
            return Ok((len, MsgFlags::from_bits_truncate(hdr.msg_flags), fds));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What a received packet was: cut short (its descriptors closed), the
/// end of the connection (nothing at all), or data.
fn classify(len: usize, truncated: bool, fds: Vec<OwnedFd>) -> Packet {
    if truncated {
        return Packet::Truncated;
    }
    if len == 0 && fds.is_empty() {
        return Packet::Eof;
    }
    Packet::Data { len, fds }
}

/// Most packets one [`PacketBatch`] receives in one system call.
pub const MAX_BATCH: usize = 8;
/// Most descriptors one message can carry (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
/// Room for one packet's ancillary data, in `u64` words (aligned for
/// `cmsghdr`): a header and as many descriptors as a message can carry,
/// so that the kernel never closes one it could not fit (`MSG_CTRUNC`)
/// on the receiving thread — that close can block (review rvunsafe).
const CMSG_WORDS: usize = (16 + 4 * SCM_MAX_FD).div_ceil(8);

/// Receives up to [`MAX_BATCH`] `SOCK_SEQPACKET` packets with one
/// `recvmmsg(2)` without blocking, each into a slot of its own that is
/// one byte larger than the largest packet accepted, so that a packet
/// that does not fit is reported as [`Packet::Truncated`] (as
/// [`recv_packet`] does). Fewer packets than slots means the socket was
/// drained: unlike a loop of non-blocking `recvmsg` calls, the reader
/// needs no extra call that finds the socket empty (issue 16).
///
/// Descriptors the packets carried are not in their [`Packet::Data`]:
/// they are kept aside, across calls, until [`PacketBatch::take_descriptors`]
/// takes them, so that the caller chooses the thread that closes them (a
/// close can block as long as the sender likes; review rvunsafe);
/// [`PacketBatch::carried_descriptors`] tells which packets had some.
#[derive(Default)]
pub struct PacketBatch {
    slot: usize,
    slots: usize,
    data: Vec<u8>,
    control: Vec<u64>,
    got: Vec<Packet>,
    /// Per packet of `got`: whether it carried descriptors (or had some
    /// cut, `MSG_CTRUNC`).
    carried: Vec<bool>,
    /// The descriptors received and not taken yet.
    fds: Vec<OwnedFd>,
}

impl PacketBatch {
    /// A batch of `slots` (at most [`MAX_BATCH`]) buffers of `slot` bytes.
    pub fn new(slots: usize, slot: usize) -> PacketBatch {
        let slots = slots.clamp(1, MAX_BATCH);
        PacketBatch {
            slot,
            slots,
            data: vec![0u8; slots * slot],
            control: vec![0u64; slots * CMSG_WORDS],
            got: Vec::with_capacity(slots),
            carried: Vec::with_capacity(slots),
            fds: Vec::new(),
        }
    }

    /// How many packets one call can receive.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Receives what is queued on `sock`, up to [`Self::slots`] packets,
    /// without blocking; returns how many (0: nothing was queued). The
    /// previous call's packets are dropped, not the descriptors they
    /// carried ([`PacketBatch::take_descriptors`]). An error the kernel
    /// met after the first packet is reported by the next call.
    pub fn recv_nonblocking(&mut self, sock: BorrowedFd<'_>) -> io::Result<usize> {
        self.got.clear();
        self.carried.clear();
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero
        // bytes (null pointers, zero lengths) are valid values.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let slots = self.slots.min(MAX_BATCH);
        let data = self.data.chunks_mut(self.slot.max(1));
        let control = self.control.chunks_mut(CMSG_WORDS);
        for (((v, m), buf), ctl) in iov
            .iter_mut()
            .zip(msgs.iter_mut())
            .zip(data)
            .zip(control)
            .take(slots)
        {
            v.iov_base = buf.as_mut_ptr().cast();
            v.iov_len = buf.len();
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = ctl.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of_val(ctl);
        }
        let n = loop {
            // SAFETY: `msgs` holds `slots` headers, each pointing at one
            // iovec of `iov` and at a control buffer of its own, all of
            // which live (and are not otherwise borrowed) until the call
            // returns; the kernel writes only within the lengths given.
            let n = unsafe {
                libc::recvmmsg(
                    sock.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    u32::try_from(slots).unwrap_or(1),
                    libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                break usize::try_from(n).unwrap_or(0);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        };
        for m in msgs.iter().take(n.min(slots)) {
            let fds = scm_rights(&m.msg_hdr);
            let carried = !fds.is_empty() || m.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0;
            self.fds.extend(fds);
            let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            let len = usize::try_from(m.msg_len).unwrap_or(usize::MAX);
            self.got.push(if carried && !truncated {
                // Not the end of the connection, even if empty.
                Packet::Data {
                    len,
                    fds: Vec::new(),
                }
            } else {
                classify(len, truncated, Vec::new())
            });
            self.carried.push(carried);
        }
        Ok(self.got.len())
    }

    /// Whether packet `i` of the last call carried descriptors (kept
    /// aside for [`PacketBatch::take_descriptors`]) or had some cut from
    /// it (`MSG_CTRUNC`: this process's descriptor table was full).
    pub fn carried_descriptors(&self, i: usize) -> bool {
        self.carried.get(i).copied().unwrap_or(false)
    }

    /// Takes the descriptors received and not taken yet.
    pub fn take_descriptors(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    /// Packet `i` of the last call and its bytes.
    pub fn get(&self, i: usize) -> Option<(&Packet, &[u8])> {
        let p = self.got.get(i)?;
        let bytes = match p {
            Packet::Data { len, .. } => {
                let start = i.checked_mul(self.slot)?;
                self.data.get(start..start.checked_add(*len)?)?
            }
            _ => &[],
        };
        Some((p, bytes))
    }
}

/// Takes ownership of the descriptors an `SCM_RIGHTS` message of `hdr`
/// (as the kernel filled it in) carried.
fn scm_rights(hdr: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `hdr`'s control buffer and set its
    // `msg_controllen`; CMSG_FIRSTHDR / CMSG_NXTHDR never step past it, and
    // each header's data holds `cmsg_len - CMSG_LEN(0)` bytes.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                // `cmsg_len` is a size_t with glibc, a u32 with musl.
                #[allow(clippy::useless_conversion)]
                let bytes = usize::try_from((*c).cmsg_len)
                    .unwrap_or(0)
                    .saturating_sub(libc::CMSG_LEN(0) as usize);
                for k in 0..bytes / std::mem::size_of::<libc::c_int>() {
                    // SCM_RIGHTS just installed these descriptors in our
                    // table; nothing else owns them, so each is wrapped once.
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
    fds
}

/// Sends one packet, with at most one descriptor as `SCM_RIGHTS`. Never
/// raises SIGPIPE.
pub fn send_packet(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let raw;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(f) => {
            raw = [f.as_raw_fd()];
            &[ControlMessage::ScmRights(&raw)]
        }
        None => &[],
    };
    loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Sends one packet without blocking: `Ok(false)` when the peer's socket
/// buffer is full (`EAGAIN`), so the caller can queue it.
pub fn send_packet_nonblocking(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<bool> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(bytes)];
    let raw;
    let cmsgs: &[ControlMessage<'_>] = match fd {
        Some(f) => {
            raw = [f.as_raw_fd()];
            &[ControlMessage::ScmRights(&raw)]
        }
        None => &[],
    };
    loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return Ok(false),
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Sends one packet, waiting for room in the peer's socket buffer until
/// `deadline`: `Ok(false)` when there was none by then (a SEQPACKET send
/// is whole or nothing, so nothing was sent). Never raises SIGPIPE.
pub fn send_packet_until(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    deadline: std::time::Instant,
) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        if send_packet_nonblocking(sock, bytes, fd)? {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(sock, PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// `SO_PASSRIGHTS` (Linux 6.16; the libc crate may not name it yet): 83
/// in `<asm-generic/socket.h>` and on alpha and mips, 0x5c on sparc, 0x4051
/// on parisc (which has no Rust target).
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
pub const SO_PASSRIGHTS: libc::c_int = 83;
/// `SO_PASSRIGHTS` on sparc (`arch/sparc/include/uapi/asm/socket.h`).
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
pub const SO_PASSRIGHTS: libc::c_int = 0x5c;

/// Whether this kernel has `SO_PASSRIGHTS` (asked with `getsockopt` on a
/// fresh Unix socket, independently of [`refuse_descriptors`]): then a
/// listener that [`refuse_descriptors`] turned it off on must refuse a
/// peer's descriptors. For tests.
pub fn kernel_has_passrights() -> bool {
    let Ok(sock) = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    let mut val: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `val` and `len` are live locals for the call; `len` holds
    // `val`'s size, and getsockopt writes at most that much into `val`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0
}

/// Makes the kernel refuse descriptors sent to `sock` (`SO_PASSRIGHTS` 0):
/// a peer's `sendmsg` with `SCM_RIGHTS` fails `EPERM`. Set on a listening
/// socket before `listen`, it holds for every connection accepted from it,
/// those still queued included. `Ok(false)`: this kernel lacks the option
/// (before Linux 6.16), and descriptors still arrive.
pub fn refuse_descriptors(sock: BorrowedFd<'_>) -> io::Result<bool> {
    let off: libc::c_int = 0;
    // SAFETY: `off` is a c_int that outlives the call, and the length
    // passed is its size; setsockopt only reads it.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&off as *const libc::c_int).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) | Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

/// Accepts a connection on `listener` (`accept4` with `flags`), owned.
/// Review rvunsafe: this was a safe `own_accepted(RawFd)` that wrapped
/// whatever number it was given, so safe code could make two owners of
/// one descriptor.
pub fn accept(listener: BorrowedFd<'_>, flags: nix::sys::socket::SockFlag) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::accept4(listener.as_raw_fd(), flags).map_err(io::Error::from)?;
    // SAFETY: accept4 just returned this descriptor; nothing else owns
    // it, so it is wrapped exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd/N` of a descriptor of this process: the name by which
/// calls that take no descriptor (or refuse an `O_PATH` one) reach its
/// file. Built from the descriptor's own number, never from a client's
/// string.
fn proc_fd_path(fd: BorrowedFd<'_>) -> io::Result<CString> {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// One entry of a directory read by [`dir_entries`]: its name, and the
/// offset of the entry after it — where a later read resumes once this
/// entry is used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name, as the filesystem has it (not always UTF-8).
    pub name: Vec<u8>,
    /// The offset to read on from once this entry is used up.
    pub next: i64,
}

/// Reads the next entries of directory `dir` from offset `at` (0: the
/// start; else the `next` of an entry an earlier read returned): one
/// `getdents64` of at most `max_bytes`, so as many entries as fit. Empty
/// at the end. A directory listing then holds only an offset between
/// reads, never the directory. An offset is valid for the open it came
/// from (as telldir's for its stream), not always for another open of the
/// same directory: overlayfs numbers a merged directory's entries per
/// open. Moves `dir`'s file position.
pub fn dir_entries(dir: BorrowedFd<'_>, at: i64, max_bytes: usize) -> io::Result<Vec<DirEntry>> {
    // SAFETY: lseek only moves the descriptor's file position.
    if unsafe { libc::lseek(dir.as_raw_fd(), at, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; max_bytes.max(512)];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`,
    // which outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
    Ok(parse_dirents(buf.get(..n).unwrap_or(&[])))
}

/// The entries of a `getdents64` buffer (`struct linux_dirent64`: inode
/// u64, next offset i64, record length u16, type u8, the name up to its
/// NUL); a record that does not fit ends the list.
fn parse_dirents(mut b: &[u8]) -> Vec<DirEntry> {
    let mut out = Vec::new();
    while let (Some(off), Some(len)) = (b.get(8..16), b.get(16..18)) {
        let next = i64::from_ne_bytes(off.try_into().unwrap_or([0; 8]));
        let len = usize::from(u16::from_ne_bytes(len.try_into().unwrap_or([0; 2])));
        let Some(record) = b.get(..len).filter(|_| len > 19) else {
            break;
        };
        let name = record.get(19..).unwrap_or(&[]);
        let end = name.iter().position(|c| *c == 0).unwrap_or(name.len());
        out.push(DirEntry {
            name: name.get(..end).unwrap_or(&[]).to_vec(),
            next,
        });
        b = b.get(len..).unwrap_or(&[]);
    }
    out
}

/// Writes as much of `buf` as one write takes at the end of the file `fd`
/// refers to, as the end is when the write runs: `pwritev2` with
/// `RWF_APPEND` (Linux 4.16), the per-write `O_APPEND`, which ignores the
/// offset (0 here: the descriptor's file position is left alone; -1 would
/// move it). Two appends never land at the same offset. The bytes
/// written, which may be fewer than `buf` holds, as for `pwrite`.
pub fn append(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which the kernel only reads and which
    // outlives the call; the count of one matches the single iovec.
    let r = unsafe { libc::pwritev2(fd.as_raw_fd(), &iov, 1, 0, libc::RWF_APPEND) };
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// Whether `fd` is an `O_PATH` descriptor (it reaches its file for
/// `fstat`, `fstatfs` and path-relative calls, never for I/O).
pub fn is_path_only(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_PATH != 0
}

/// A new `O_PATH` descriptor of the file `fd` refers to (the same inode,
/// by the `/proc/self/fd/N` magic link): it cannot read, write, map or
/// lock the file — what an attribute-only open is given.
pub fn reopen_path_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let p = proc_fd_path(fd)?;
    // SAFETY: `p` is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::open(p.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `r` is a descriptor open(2) just returned, owned by nobody.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// Sets the access and modification times of the file `fd` refers to
/// (`UTIME_OMIT` leaves one as it is): `utimensat(fd, "", AT_EMPTY_PATH)`,
/// which, unlike `futimens`, also takes an `O_PATH` descriptor.
pub fn set_times(
    fd: BorrowedFd<'_>,
    atime: libc::timespec,
    mtime: libc::timespec,
) -> io::Result<()> {
    let times = [atime, mtime];
    // SAFETY: the path is a NUL-terminated empty string and `times` is an
    // array of two timespecs; both outlive the call.
    let r = unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an extended attribute on an open file (an `O_PATH` descriptor's
/// file through `/proc/self/fd/N`: `fsetxattr` refuses those).
pub fn set_xattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr, value: &[u8]) -> io::Result<()> {
    if is_path_only(fd) {
        let p = proc_fd_path(fd)?;
        // SAFETY: `p` and `name` are NUL-terminated and `value` is a valid
        // slice for the length passed; all outlive the call.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        return if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    // SAFETY: `name` is NUL-terminated and `value` is a valid slice for the
    // length passed; both outlive the call.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an extended attribute of an open file (at most 1 KiB); `None` when
/// it is absent.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = [0u8; 1024];
    let r = if is_path_only(fd) {
        let p = proc_fd_path(fd)?;
        // SAFETY: `buf` is valid for writes of its full length; `p` and
        // `name` are NUL-terminated.
        unsafe {
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    } else {
        // SAFETY: `buf` is valid for writes of its full length; `name` is
        // NUL-terminated.
        unsafe {
            libc::fgetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    let n = usize::try_from(r).unwrap_or(0).min(buf.len());
    Ok(Some(buf.get(..n).unwrap_or_default().to_vec()))
}

/// Removes an extended attribute from an open file (absent is not an error).
pub fn remove_xattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<()> {
    let r = if is_path_only(fd) {
        let p = proc_fd_path(fd)?;
        // SAFETY: `p` and `name` are NUL-terminated and outlive the call.
        unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }
    } else {
        // SAFETY: `name` is NUL-terminated and outlives the call.
        unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA) => Ok(()),
        _ => Err(e),
    }
}

/// Gives the anonymous file `fd` (from `O_TMPFILE`) the name `leaf` in
/// directory `dir`: `linkat` with `AT_EMPTY_PATH` (needs
/// `CAP_DAC_READ_SEARCH`), or, without the capability, through
/// `/proc/self/fd/N` with `AT_SYMLINK_FOLLOW` (what open(2) documents for
/// unprivileged callers). `leaf` must be a single component.
pub fn link_tmpfile(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, leaf: &str) -> io::Result<()> {
    if leaf.contains('/') || leaf.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let cleaf = CString::new(leaf).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::linkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            cleaf.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOENT)) {
        return Err(e);
    }
    let proc_path = proc_fd_path(fd)?;
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            dir.as_raw_fd(),
            cleaf.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the file `fd` refers to has no open file description other than
/// `fd`'s own — anyone's, this process's other descriptors included. The
/// probe is the kernel's write-lease rule: `F_SETLEASE F_WRLCK` succeeds
/// only while no other open of the inode exists (it fails with `EAGAIN`
/// otherwise); a lease taken is released at once. Needs the file's owner or
/// `CAP_LEASE`; a filesystem without leases gives `EINVAL`. A local open
/// arriving in between waits (in `break_lease`) for the release, and its
/// break signal (`SIGIO`) goes to this process: block it.
pub fn alone_on_inode(fd: BorrowedFd<'_>) -> io::Result<bool> {
    alone_on_inode_holding(fd, || {})
}

/// [`alone_on_inode`], running `while_held` while the lease is held (for a
/// test to widen that window).
pub fn alone_on_inode_holding(fd: BorrowedFd<'_>, while_held: impl FnOnce()) -> io::Result<bool> {
    // SAFETY: fcntl on a borrowed, open descriptor with an int argument.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) };
    if r == -1 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            _ => Err(e),
        };
    }
    while_held();
    // SAFETY: as above; releases the lease just taken.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`):
/// unlike a wall clock, it does not run while the thread waits for a CPU
/// on a loaded machine. `None` if the clock cannot be read.
pub fn thread_cpu_time() -> Option<std::time::Duration> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .ok()
        .map(std::time::Duration::from)
}

/// `(st_dev, st_ino)` of what `path` names, following links (a
/// `/proc/PID/fd/N` magic link gives the open file), without opening it and
/// without asking a network filesystem's server (`AT_STATX_DONT_SYNC`).
pub fn dev_ino_nosync(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path, `st` a valid out-pointer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            libc::STATX_INO,
            &mut st,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        libc::makedev(st.stx_dev_major, st.stx_dev_minor),
        st.stx_ino,
    ))
}

/// Whether descriptor `their_fd` of process `pid` is the same open file
/// description as this process's `my_fd` (`kcmp KCMP_FILE`: a descriptor
/// passed with `SCM_RIGHTS` or inherited is). Needs ptrace access to `pid`
/// (root); an error means "cannot tell".
pub fn same_file_description(pid: i32, their_fd: i32, my_fd: BorrowedFd<'_>) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    let me = libc::c_long::from(i32::try_from(std::process::id()).unwrap_or(-1));
    // SAFETY: kcmp only compares kernel objects named by pids and fd numbers;
    // no memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(pid),
            me,
            KCMP_FILE,
            libc::c_long::from(their_fd),
            libc::c_long::from(my_fd.as_raw_fd()),
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(r == 0)
}

/// A private, detached copy of the mount tree at `path`
/// (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`), opened as a directory
/// (`O_RDONLY | O_DIRECTORY`) at its root. The copy shows the same files
/// but is a mount of its own: a fanotify mark on the original mount does
/// not cover it, and an ignore mark on it exempts opens made through it.
/// It lives while a descriptor refers to it. Needs `CAP_SYS_ADMIN`.
pub fn clone_mount(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; no other
    // memory is passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::c_long::from(libc::AT_FDCWD),
            c.as_ptr(),
            libc::c_long::from(flags),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let raw = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    let tree = unsafe { OwnedFd::from_raw_fd(raw) };
    // open_tree gives an O_PATH descriptor; open_by_handle_at and fanotify
    // need a real one on the same mount.
    openat2_beneath(tree.as_fd(), ".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
}

/// One fanotify event as read by [`read_fanotify`].
#[derive(Debug)]
pub struct FanEvent {
    /// The event mask (`FAN_OPEN_PERM`, `FAN_Q_OVERFLOW`, ...).
    pub mask: u64,
    /// The process that caused it.
    pub pid: i32,
    /// The event's descriptor; `Err(errno)` when the kernel could not open
    /// it (`FAN_REPORT_FD_ERROR`: a permission event without one has
    /// already been refused by the kernel); `Err(0)` for none
    /// (`FAN_NOFD`, a queue overflow).
    pub fd: Result<OwnedFd, i32>,
}

/// Bytes queued to read on `fd` (`FIONREAD`; for a fanotify group, its
/// events not yet read).
pub fn queued_bytes(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which lives.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(n)
}

/// The supplementary groups of a Unix socket's peer as they were when it
/// connected (`SO_PEERGROUPS`, Linux 4.13 and later): taken by the kernel
/// with its `SO_PEERCRED`, so unlike `/proc/PID/status` they cannot belong
/// to another process that reused the peer's pid. `Ok(None)`: the kernel
/// does not know the option.
pub fn peer_groups(sock: BorrowedFd<'_>) -> io::Result<Option<Vec<libc::gid_t>>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    // At most a few rounds: the groups of a connected peer do not change,
    // so the size the kernel asks for after ERANGE is enough.
    for _ in 0..4 {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| io::Error::from_raw_os_error(libc::ERANGE))?;
        // SAFETY: the kernel writes at most `len` bytes into `groups`,
        // which holds that many, and stores the size used (or, with
        // ERANGE, needed) in `len`.
        let r = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let used = usize::try_from(len).unwrap_or(usize::MAX) / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(used);
            return Ok(Some(groups));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOPROTOOPT) => return Ok(None),
            Some(libc::ERANGE) if used > groups.len() => groups.resize(used, 0),
            _ => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// The UUID of the filesystem `fd` lives on (`FS_IOC_GETFSUUID`, Linux
/// 6.5 and later), when it has one that is not all zeros (an image made
/// without one says zeros, as any other such image would).
pub fn filesystem_uuid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    /// `struct fsuuid2`: len u8, uuid [u8; 16].
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    /// `_IOR(0x15, 0, struct fsuuid2)`.
    const FS_IOC_GETFSUUID: libc::c_ulong = 0x8011_1500;
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the ioctl writes at most one `struct fsuuid2` (17 bytes)
    // through the pointer, which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETFSUUID, &mut u) };
    (r == 0 && u.len == 16 && u.uuid != [0; 16]).then_some(u.uuid)
}

/// `struct fanotify_event_metadata`: event_len u32, vers u8, reserved u8,
/// metadata_len u16, mask u64, fd i32, pid i32 (24 bytes) — the whole
/// event of a group that asks for no information records.
pub const FAN_EVENT_LEN: usize = 24;

/// Reads what one `read` of the fanotify group `fan` gives into events,
/// at most `max` of them (each event the kernel reads makes a descriptor,
/// so a caller short of descriptors asks for fewer; at most 170, and at
/// least one). Each descriptor is owned by its event (closed on drop).
/// Unlike nix's reader it accepts the negative descriptors of
/// `FAN_REPORT_FD_ERROR`.
pub fn read_fanotify(fan: BorrowedFd<'_>, max: usize) -> io::Result<Vec<FanEvent>> {
    const META: usize = FAN_EVENT_LEN;
    let mut buf = [0u8; 4096];
    // The kernel stops before an event that does not fit in the buffer.
    let len = max.clamp(1, buf.len() / META) * META;
    let n =
        nix::unistd::read(fan, buf.get_mut(..len).unwrap_or_default()).map_err(io::Error::from)?;
    let data = buf.get(..n).unwrap_or_default();
    let mut events = Vec::new();
    let mut off = 0usize;
    while let Some(meta) = data.get(off..off + META) {
        let u32_at = |i: usize| {
            meta.get(i..i + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
                .unwrap_or(0)
        };
        let event_len = usize::try_from(u32_at(0)).unwrap_or(0);
        let mask = meta
            .get(8..16)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
            .unwrap_or(0);
        let fd = i32::from_ne_bytes(u32_at(16).to_ne_bytes());
        let pid = i32::from_ne_bytes(u32_at(20).to_ne_bytes());
        let fd = match fd {
            fd if fd >= 0 => {
                // SAFETY: the kernel installed this descriptor in our table
                // for this event; only this event owns it.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            }
            libc::FAN_NOFD => Err(0),
            e => Err(-e),
        };
        events.push(FanEvent { mask, pid, fd });
        if event_len < META {
            break;
        }
        off = off.saturating_add(event_len);
    }
    Ok(events)
}

/// Turns glibc malloc's fastbins off (`mallopt(M_MXFAST, 0)`); call it
/// first thing, before other threads exist. With fastbins, every free
/// that merges into the heap's top chunk runs `malloc_consolidate` over
/// them: issue 16's profile of filterd's engine thread found that at 7 %
/// of its time in non-durable open+close, once per request (the request
/// decoder's buffers are freed next to the top). Small blocks still come
/// from glibc's per-thread cache. Returns whether glibc took it (a no-op
/// on other C libraries).
pub fn no_malloc_fastbins() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter; called before
        // other threads run, so no allocation races the change.
        unsafe { libc::mallopt(libc::M_MXFAST, 0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// How many of this process's descriptors are memfds named `name`
    /// (tests run on threads of one process: only these are counted).
    fn memfds_named(name: &str) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd")
            .filter_map(Result::ok)
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.to_string_lossy().contains(name))
            .count()
    }

    /// Sends `bytes` on `sock` with `n` fresh memfds named `name` (none
    /// when `n` is 0), closing this side's copies.
    fn send_memfds(sock: &OwnedFd, name: &str, bytes: &[u8], n: usize) {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let files: Vec<OwnedFd> = (0..n)
            .map(|_| {
                nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                    .expect("a memfd")
            })
            .collect();
        let raw: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            sock.as_raw_fd(),
            &[std::io::IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .expect("sent");
    }

    /// Review rvunsafe: a [`PacketBatch`] keeps the descriptors packets
    /// carried aside until taken (the caller picks the thread that closes
    /// them), says which packets had some, and takes an empty packet with
    /// descriptors for data, not the end of the connection; a packet with
    /// descriptors was `Truncated` when they did not fit (answered "frame
    /// exceeds 65536 bytes"), now it has room for the most a message can
    /// carry.
    #[test]
    fn a_batch_keeps_the_descriptors_packets_carried_until_taken() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let name = format!("rkf-batch-{}", uuid::Uuid::new_v4());
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair");
        send_memfds(&theirs, &name, b"", 200);
        send_memfds(&theirs, &name, b"plain", 0);
        let mut batch = PacketBatch::new(MAX_BATCH, 64);
        assert_eq!(batch.recv_nonblocking(ours.as_fd()).expect("received"), 2);
        assert!(matches!(
            batch.get(0),
            Some((Packet::Data { len: 0, .. }, _))
        ));
        assert!(batch.carried_descriptors(0));
        assert!(matches!(
            batch.get(1),
            Some((Packet::Data { len: 5, .. }, b"plain"))
        ));
        assert!(!batch.carried_descriptors(1));
        // Kept across calls, closed only once taken and dropped.
        assert_eq!(batch.recv_nonblocking(ours.as_fd()).expect("received"), 0);
        assert_eq!(memfds_named(&name), 200);
        let fds = batch.take_descriptors();
        assert_eq!(fds.len(), 200);
        drop(fds);
        assert_eq!(memfds_named(&name), 0);
    }

    /// Review rvunsafe: a packet carrying more descriptors than
    /// [`recv_packet`] has room for (`MSG_CTRUNC`) left the four the kernel
    /// did install open for good (nix's `cmsgs()` yields nothing then).
    /// Now they are owned and closed with the packet, and
    /// [`recv_packet_cut`] hands them over.
    #[test]
    fn descriptors_of_a_cut_packet_are_closed_not_leaked() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let name = format!("rkf-cut-{}", uuid::Uuid::new_v4());
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("a socket pair");
        let mut buf = [0u8; 16];
        send_memfds(&theirs, &name, b"five", 5);
        let p = recv_packet(ours.as_fd(), &mut buf).expect("received");
        assert!(matches!(p, Packet::Truncated), "{p:?}");
        drop(p);
        assert_eq!(memfds_named(&name), 0, "every descriptor closed");
        send_memfds(&theirs, &name, b"five", 5);
        let got = recv_packet_cut(ours.as_fd(), &mut buf, false).expect("received");
        match &got {
            Some((Packet::Data { len: 4, fds }, true)) => assert_eq!(fds.len(), 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(memfds_named(&name), 4, "the four that arrived");
        drop(got);
        assert_eq!(memfds_named(&name), 0, "every descriptor closed");
    }

    #[test]
    fn a_directory_read_resumes_at_an_entrys_offset() {
        let dir = std::env::temp_dir().join(format!("rkf-dirents-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut want: Vec<Vec<u8>> = (0..300)
            .map(|i| format!("f{i:03}-{}", "n".repeat(i % 40)).into_bytes())
            .collect();
        for n in &want {
            std::fs::write(dir.join(std::str::from_utf8(n).unwrap()), b"").unwrap();
        }
        want.push(b".".to_vec());
        want.push(b"..".to_vec());
        want.sort();
        // A few entries per read, each from the offset the last one ended
        // at (the position moved meanwhile, as another read would move it).
        let (mut got, mut at) = (Vec::new(), 0i64);
        let fd = std::fs::File::open(&dir).unwrap();
        loop {
            dir_entries(fd.as_fd(), 0, 512).unwrap();
            let batch = dir_entries(fd.as_fd(), at, 512).unwrap();
            let Some(last) = batch.last() else { break };
            at = last.next;
            got.extend(batch.into_iter().map(|e| e.name));
        }
        got.sort();
        assert_eq!(got, want);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_short_or_broken_dirent_record_ends_the_list() {
        let mut rec = vec![0u8; 24];
        rec[8..16].copy_from_slice(&7i64.to_ne_bytes());
        rec[16..18].copy_from_slice(&24u16.to_ne_bytes());
        rec[19..22].copy_from_slice(b"abc");
        let one = parse_dirents(&rec);
        assert_eq!(
            one,
            vec![DirEntry {
                name: b"abc".to_vec(),
                next: 7
            }]
        );
        let mut two = rec.clone();
        two.extend_from_slice(&rec[..20]); // a second record cut short
        assert_eq!(parse_dirents(&two), one);
        let mut zero = rec.clone();
        zero[16..18].copy_from_slice(&0u16.to_ne_bytes());
        assert!(parse_dirents(&zero).is_empty());
        assert!(parse_dirents(&rec[..10]).is_empty());
    }

    #[test]
    fn the_write_lease_probe_sees_other_opens() {
        let dir = std::env::temp_dir().join(format!("rkf-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"x").unwrap();
        let mine = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        if alone_on_inode(mine.as_fd()).is_err() {
            return; // no leases on this filesystem, or no CAP_LEASE
        }
        assert!(alone_on_inode(mine.as_fd()).unwrap());
        let other = std::fs::File::open(&path).unwrap();
        assert!(!alone_on_inode(mine.as_fd()).unwrap());
        // The same open file description elsewhere (a dup, a passed fd)
        // is not another open.
        let dup = mine.try_clone().unwrap();
        drop(other);
        assert!(alone_on_inode(mine.as_fd()).unwrap());
        assert!(same_file_description(
            i32::try_from(std::process::id()).unwrap(),
            dup.as_raw_fd(),
            mine.as_fd()
        )
        .unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn openat2_confines() {
        let dir = std::env::temp_dir().join(format!("rkf-sys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", dir.join("sub/rel")).unwrap();
        std::os::unix::fs::symlink("f", dir.join("sub/ok")).unwrap();
        let root = std::fs::File::open(&dir).unwrap();
        let r = root.as_fd();
        assert!(openat2_beneath(r, "sub/f", libc::O_RDONLY, 0).is_ok());
        assert!(openat2_beneath(r, "sub/ok", libc::O_RDONLY, 0).is_ok());
        for bad in ["abs", "sub/rel", "../etc/passwd", "/etc/passwd"] {
            let e = openat2_beneath(r, bad, libc::O_RDONLY, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EXDEV), "{bad}");
        }
        let f = openat2_beneath(r, "sub/f", libc::O_RDONLY, 0).unwrap();
        let h = file_handle_of(f.as_fd());
        // tmpfs and most disk filesystems support file handles.
        if let Ok(h) = h {
            assert!(!h.bytes.is_empty());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
