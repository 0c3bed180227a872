//! File metadata as Windows reports it, and the MS-FSCC information
//! classes rksmbd encodes from it: file classes for QUERY_INFO (2.4),
//! filesystem classes (2.5) and directory-entry classes for
//! QUERY_DIRECTORY.

use std::os::fd::AsFd;

use nix::sys::stat::{FileStat, SFlag};

use crate::wire::{self, status, Writer};

/// FILE_ATTRIBUTE_DIRECTORY.
pub const ATTR_DIRECTORY: u32 = 0x10;
/// FILE_ATTRIBUTE_ARCHIVE: what Windows reports for a plain file.
pub const ATTR_ARCHIVE: u32 = 0x20;
/// FILE_ATTRIBUTE_NORMAL: a file with no other attribute.
pub const ATTR_NORMAL: u32 = 0x80;
/// The DOS attributes kept per file (MS-FSCC 2.6): read-only, hidden,
/// system, archive.
pub const DOS_KEPT: u32 = 0x1 | 0x2 | 0x4 | ATTR_ARCHIVE;
/// The extended attribute that keeps them (4 bytes, little-endian); a
/// file without it is ARCHIVE (a directory: no DOS attribute).
const DOS_XATTR: &std::ffi::CStr = c"user.rkfilter.dosattrib";

/// The DOS attributes kept for the file open as `fd`, if any (none for a
/// descriptor that cannot read extended attributes).
pub fn dos_attributes(fd: impl AsFd) -> Option<u32> {
    let v = libfilter::sys::get_xattr(fd.as_fd(), DOS_XATTR).ok()??;
    let b: [u8; 4] = v.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b) & DOS_KEPT)
}

/// Keeps `attrs` (FILE_ATTRIBUTE_NORMAL: none) as the DOS attributes of
/// the file open as `fd`.
pub fn set_dos_attributes(fd: impl AsFd, attrs: u32) -> Result<(), u32> {
    let v = (attrs & DOS_KEPT).to_le_bytes();
    libfilter::sys::set_xattr(fd.as_fd(), DOS_XATTR, &v).map_err(|e| {
        e.raw_os_error()
            .map(|n| crate::files::errno_status(nix::errno::Errno::from_raw(n)))
            .unwrap_or(status::INTERNAL_ERROR)
    })
}

/// What QUERY_INFO and QUERY_DIRECTORY report about a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Meta {
    /// Creation time (FILETIME); the oldest of the POSIX times.
    pub created: u64,
    /// Last access (FILETIME).
    pub accessed: u64,
    /// Last write (FILETIME).
    pub written: u64,
    /// Last change (FILETIME).
    pub changed: u64,
    /// End of file.
    pub size: u64,
    /// Allocation size.
    pub allocated: u64,
    /// Inode number (FileId / IndexNumber).
    pub ino: u64,
    /// The device of the inode.
    pub dev: u64,
    /// Hard links.
    pub links: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's group id.
    pub gid: u32,
    /// A directory.
    pub is_dir: bool,
    /// The DOS attributes kept for it ([`dos_attributes`]), if known.
    pub dos: Option<u32>,
}

fn filetime(secs: i64, nsecs: i64) -> u64 {
    let s = u64::try_from(secs.saturating_add(11_644_473_600)).unwrap_or(0);
    let n = u64::try_from(nsecs).unwrap_or(0) / 100;
    s.saturating_mul(10_000_000).saturating_add(n)
}

impl Meta {
    /// From a stat.
    pub fn from_stat(st: &FileStat) -> Meta {
        let accessed = filetime(st.st_atime, st.st_atime_nsec);
        let written = filetime(st.st_mtime, st.st_mtime_nsec);
        let changed = filetime(st.st_ctime, st.st_ctime_nsec);
        let is_dir = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
        Meta {
            created: accessed.min(written).min(changed),
            accessed,
            written,
            changed,
            size: if is_dir {
                0
            } else {
                u64::try_from(st.st_size).unwrap_or(0)
            },
            allocated: u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512),
            ino: st.st_ino,
            dev: st.st_dev,
            links: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
            uid: st.st_uid,
            gid: st.st_gid,
            is_dir,
            dos: None,
        }
    }

    /// Of an open descriptor, with its kept DOS attributes.
    pub fn of(fd: impl AsFd) -> Result<Meta, u32> {
        let st = nix::sys::stat::fstat(fd.as_fd()).map_err(|_| status::INTERNAL_ERROR)?;
        Ok(Meta {
            dos: dos_attributes(fd),
            ..Meta::from_stat(&st)
        })
    }

    /// Windows file attributes: a directory's, or a file's kept DOS
    /// attributes (ARCHIVE when none were kept, NORMAL when they are
    /// none).
    pub fn attributes(&self) -> u32 {
        match (self.is_dir, self.dos) {
            (true, d) => ATTR_DIRECTORY | d.unwrap_or(0) & !ATTR_ARCHIVE,
            (false, None) => ATTR_ARCHIVE,
            (false, Some(0)) => ATTR_NORMAL,
            (false, Some(d)) => d,
        }
    }

    fn times(&self, w: &mut Writer) {
        w.u64(self.created)
            .u64(self.accessed)
            .u64(self.written)
            .u64(self.changed);
    }
}

/// What a file-class query needs beyond the metadata.
pub struct FileFacts<'a> {
    /// The metadata.
    pub meta: Meta,
    /// Delete pending.
    pub delete_pending: bool,
    /// The granted access mask.
    pub access: u32,
    /// The path from the share root, `\`-separated with a leading `\`.
    pub name: &'a str,
    /// The open's file position (FilePositionInformation).
    pub position: u64,
    /// FileNormalizedNameInformation is offered (SMB 3.1.1, 3.3.5.20.1).
    pub normalized: bool,
}

/// FileBasicInformation (MS-FSCC 2.4.7).
fn basic(m: &Meta, w: &mut Writer) {
    m.times(w);
    w.u32(m.attributes()).u32(0);
}

/// FileStandardInformation (2.4.41).
fn standard(f: &FileFacts<'_>, w: &mut Writer) {
    let m = &f.meta;
    w.u64(m.allocated).u64(m.size).u32(m.links);
    w.u8(u8::from(f.delete_pending))
        .u8(u8::from(m.is_dir))
        .u16(0);
}

/// Encodes a file information class (QUERY_INFO, InfoType 1). Returns the
/// bytes, or the status for a class rksmbd does not offer.
pub fn file_class(class: u8, f: &FileFacts<'_>) -> Result<Vec<u8>, u32> {
    let mut w = Writer::new();
    let m = &f.meta;
    match class {
        4 => basic(m, &mut w),
        5 => standard(f, &mut w),
        6 => {
            w.u64(m.ino);
        }
        7 => {
            w.u32(0);
        }
        8 => {
            w.u32(f.access);
        }
        9 => {
            let name = wire::to_utf16(f.name);
            w.u32(wire::len32(name.len())).bytes(&name);
        }
        14 => {
            w.u64(f.position);
        }
        16 => {
            w.u32(0);
        }
        17 => {
            w.u32(0);
        }
        // FileAllInformation (2.4.2).
        18 => {
            basic(m, &mut w);
            standard(f, &mut w);
            w.u64(m.ino)
                .u32(0)
                .u32(f.access)
                .u64(f.position)
                .u32(0)
                .u32(0);
            let name = wire::to_utf16(f.name);
            w.u32(wire::len32(name.len())).bytes(&name);
        }
        // FileStreamInformation (2.4.44): the one unnamed data stream.
        22 => {
            if !m.is_dir {
                let name = wire::to_utf16("::$DATA");
                w.u32(0).u32(wire::len32(name.len()));
                w.u64(m.size).u64(m.allocated).bytes(&name);
            }
        }
        // FileNetworkOpenInformation (2.4.29).
        34 => {
            m.times(&mut w);
            w.u64(m.allocated).u64(m.size).u32(m.attributes()).u32(0);
        }
        // FileAttributeTagInformation (2.4.6).
        35 => {
            w.u32(m.attributes()).u32(0);
        }
        // FileNormalizedNameInformation (2.4.30): the name from the
        // share's root, without the leading separator (the root's is
        // empty); only on SMB 3.1.1.
        48 => {
            if !f.normalized {
                return Err(status::NOT_SUPPORTED);
            }
            let name = wire::to_utf16(f.name.trim_start_matches('\\'));
            w.u32(wire::len32(name.len())).bytes(&name);
        }
        // FileCompressionInformation (2.4.9): not compressed.
        28 => {
            w.u64(m.size).u16(0).u8(0).u8(0).u8(0).u8(0).u16(0);
        }
        // FileAlternateNameInformation (2.4.5): there are no 8.3 names;
        // the name itself stands in (smbclient's allinfo needs an answer).
        21 => {
            let leaf = f.name.rsplit('\\').next().unwrap_or("");
            let name = wire::to_utf16(leaf);
            w.u32(wire::len32(name.len())).bytes(&name);
        }
        _ => return Err(status::INVALID_INFO_CLASS),
    }
    Ok(w.0)
}

/// The access a file information class needs of the open (MS-FSA
/// 2.1.5.12): FILE_READ_ATTRIBUTES for the classes that report times and
/// attributes, FILE_READ_EA for the extended attributes themselves; none
/// for the rest (smbtorture smb2.getinfo.getinfo_access).
pub fn file_class_access(class: u8) -> u32 {
    const FILE_READ_EA: u32 = 0x8;
    const FILE_READ_ATTRIBUTES: u32 = 0x80;
    match class {
        // Basic, All, NetworkOpen, AttributeTag.
        4 | 18 | 34 | 35 => FILE_READ_ATTRIBUTES,
        // FullEa.
        15 => FILE_READ_EA,
        _ => 0,
    }
}

/// How many bytes of a file or filesystem class's answer (`full` bytes
/// long) an output buffer must hold, at least: a smaller buffer is
/// STATUS_INFO_LENGTH_MISMATCH, one at least this large but smaller than
/// the answer gets it cut, with STATUS_BUFFER_OVERFLOW. A class with a
/// variable-length tail needs its structure's size as Windows declares it
/// (a name's structure holds one character, padded: 8 bytes where the
/// length field is 4; smbtorture smb2.getinfo.qfile_buffercheck and
/// qfs_buffercheck); any other class needs all of it.
pub fn fixed_len(info_type: u8, class: u8, full: usize) -> usize {
    match (info_type, class) {
        // FileNameInformation, FileAlternateNameInformation,
        // FileNormalizedNameInformation.
        (1, 9 | 21 | 48) => 8,
        // FileAllInformation: 96 bytes before its name information.
        (1, 18) => 104,
        // FileStreamInformation: one entry with its name.
        (1, 22) => 32,
        // FileFsVolumeInformation.
        (2, 1) => 24,
        // FileFsAttributeInformation.
        (2, 5) => 16,
        _ => full,
    }
}

/// Encodes a filesystem information class (QUERY_INFO, InfoType 2) for
/// the filesystem holding `fd`.
pub fn fs_class(class: u8, fd: impl AsFd) -> Result<Vec<u8>, u32> {
    let mut w = Writer::new();
    let vfs = || nix::sys::statvfs::fstatvfs(fd.as_fd()).map_err(|_| status::INTERNAL_ERROR);
    // Report in allocation units of one block: sectors of 512 bytes.
    let units = |v: &nix::sys::statvfs::Statvfs| {
        let frsize = v.fragment_size().max(512);
        let spu = u32::try_from(frsize / 512).unwrap_or(1).max(1);
        (v.blocks(), v.blocks_available(), v.blocks_free(), spu)
    };
    match class {
        // FileFsVolumeInformation (2.5.9).
        1 => {
            let label = wire::to_utf16("rksmbd");
            w.u64(0).u32(0x524B_534D).u32(wire::len32(label.len()));
            w.u8(0).u8(0).bytes(&label);
        }
        // FileFsSizeInformation (2.5.8).
        3 => {
            let v = vfs()?;
            let (total, avail, _, spu) = units(&v);
            w.u64(total).u64(avail).u32(spu).u32(512);
        }
        // FileFsDeviceInformation (2.5.10): a disk.
        4 => {
            w.u32(7).u32(0);
        }
        // FileFsAttributeInformation (2.5.1): case-sensitive search,
        // case-preserved and Unicode names.
        5 => {
            let name = wire::to_utf16("NTFS");
            w.u32(0x7)
                .u32(255)
                .u32(wire::len32(name.len()))
                .bytes(&name);
        }
        // FileFsSectorSizeInformation (2.5.7): 512-byte sectors, aligned.
        11 => {
            w.u32(512).u32(512).u32(512).u32(512).u32(0x3).u32(0).u32(0);
        }
        // FileFsFullSizeInformation (2.5.4).
        7 => {
            let v = vfs()?;
            let (total, avail, free, spu) = units(&v);
            w.u64(total).u64(avail).u64(free).u32(spu).u32(512);
        }
        // FileFsControlInformation (2.5.2): no quotas, none enforced.
        6 => {
            w.u64(0)
                .u64(0)
                .u64(0)
                .u64(u64::MAX)
                .u64(u64::MAX)
                .u32(0)
                .u32(0);
        }
        // FileFsObjectIdInformation (2.5.6): no volume object id.
        8 => {
            w.bytes(&[0; 64]);
        }
        _ => return Err(status::INVALID_INFO_CLASS),
    }
    Ok(w.0)
}

/// OWNER_SECURITY_INFORMATION, GROUP_SECURITY_INFORMATION and
/// DACL_SECURITY_INFORMATION (MS-DTYP 2.4.7): the parts of a security
/// descriptor rksmbd answers.
pub const SECURITY_PARTS: u32 = 0x1 | 0x2 | 0x4;

/// A self-relative security descriptor (MS-DTYP 2.4.6) for a file with
/// `m`'s owner and group, holding the parts `parts` asks for: the owner
/// and group as Samba names Unix ids (S-1-22-1-uid, S-1-22-2-gid), and a
/// DACL that allows everyone all access — which is what holds: rksmbd
/// keeps no ACLs, and every user of a share may do to its files what the
/// share allows. No SACL is kept, so none is given.
pub fn security_descriptor(m: &Meta, parts: u32) -> Vec<u8> {
    const SE_DACL_PRESENT: u16 = 0x0004;
    const SE_SELF_RELATIVE: u16 = 0x8000;
    const HEADER: usize = 20;
    let sid = |sub: &[u32], authority: u8| {
        let mut w = Writer::new();
        w.u8(1).u8(u8::try_from(sub.len()).unwrap_or(0));
        w.bytes(&[0, 0, 0, 0, 0, authority]);
        for s in sub {
            w.u32(*s);
        }
        w.0
    };
    let owner = (parts & 0x1 != 0).then(|| sid(&[1, m.uid], 22));
    let group = (parts & 0x2 != 0).then(|| sid(&[2, m.gid], 22));
    let dacl = (parts & 0x4 != 0).then(|| {
        let everyone = sid(&[0], 1);
        // Objects inherit it too: OBJECT_INHERIT | CONTAINER_INHERIT.
        let flags = if m.is_dir { 0x3 } else { 0 };
        let ace_len = 8 + everyone.len();
        let mut w = Writer::new();
        w.u8(2).u8(0).u16(wire::len16(8 + ace_len)).u16(1).u16(0);
        w.u8(0).u8(flags).u16(wire::len16(ace_len));
        w.u32(crate::files::FILE_ALL_ACCESS).bytes(&everyone);
        w.0
    });
    let mut control = SE_SELF_RELATIVE;
    if dacl.is_some() {
        control |= SE_DACL_PRESENT;
    }
    let mut at = HEADER;
    let mut offset = |part: &Option<Vec<u8>>| match part {
        Some(b) => {
            let o = at;
            at += b.len();
            wire::len32(o)
        }
        None => 0,
    };
    let (o_owner, o_group, o_dacl) = (offset(&owner), offset(&group), offset(&dacl));
    let mut w = Writer::new();
    w.u8(1).u8(0).u16(control);
    w.u32(o_owner).u32(o_group).u32(0).u32(o_dacl);
    for part in [owner, group, dacl].into_iter().flatten() {
        w.bytes(&part);
    }
    w.0
}

/// Directory-entry classes (QUERY_DIRECTORY, MS-FSCC 2.4): the fixed part
/// size, or none for a class rksmbd does not offer.
pub fn dir_class_fixed(class: u8) -> Option<usize> {
    match class {
        1 => Some(64),     // FileDirectoryInformation
        2 => Some(68),     // FileFullDirectoryInformation
        3 => Some(94),     // FileBothDirectoryInformation
        12 => Some(12),    // FileNamesInformation
        0x25 => Some(104), // FileIdBothDirectoryInformation
        0x26 => Some(80),  // FileIdFullDirectoryInformation
        _ => None,
    }
}

/// One directory entry in `class` (NextEntryOffset left 0).
pub fn dir_entry(class: u8, name: &str, m: &Meta) -> Vec<u8> {
    let n = wire::to_utf16(name);
    let mut w = Writer::new();
    w.u32(0).u32(0);
    if class == 12 {
        w.u32(wire::len32(n.len())).bytes(&n);
        return w.0;
    }
    m.times(&mut w);
    w.u64(m.size).u64(m.allocated).u32(m.attributes());
    w.u32(wire::len32(n.len()));
    match class {
        2 => {
            w.u32(0);
        }
        3 => {
            w.u32(0).u8(0).u8(0).bytes(&[0; 24]);
        }
        0x25 => {
            w.u32(0).u8(0).u8(0).bytes(&[0; 24]).u16(0).u64(m.ino);
        }
        0x26 => {
            w.u32(0).u32(0).u64(m.ino);
        }
        _ => {}
    }
    w.bytes(&n);
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_entries_have_their_fixed_sizes() {
        let m = Meta::default();
        for class in [1u8, 2, 3, 12, 0x25, 0x26] {
            let e = dir_entry(class, "ab", &m);
            assert_eq!(
                e.len(),
                dir_class_fixed(class).unwrap() + 4,
                "class {class}"
            );
        }
        assert!(dir_class_fixed(99).is_none());
    }

    #[test]
    fn file_classes_have_their_sizes() {
        let f = FileFacts {
            meta: Meta::default(),
            delete_pending: false,
            access: 0,
            name: "\\a",
            position: 0,
            normalized: false,
        };
        for (class, len) in [
            (4u8, 40usize),
            (5, 24),
            (6, 8),
            (7, 4),
            (28, 16),
            (34, 56),
            (18, 104),
        ] {
            assert_eq!(file_class(class, &f).unwrap().len(), len, "class {class}");
        }
        assert_eq!(file_class(200, &f), Err(status::INVALID_INFO_CLASS));
        assert_eq!(file_class(48, &f), Err(status::NOT_SUPPORTED));
        let smb311 = FileFacts {
            normalized: true,
            ..f
        };
        // "a" without its leading separator: its length, then UTF-16.
        assert_eq!(file_class(48, &smb311).unwrap(), [2, 0, 0, 0, b'a', 0]);
    }

    /// A buffer smaller than a class's structure is refused; the name
    /// classes and FileAllInformation may be cut past it.
    #[test]
    fn a_class_needs_its_structure_and_only_a_tail_is_cut() {
        let f = FileFacts {
            meta: Meta::default(),
            delete_pending: false,
            access: 0,
            name: "\\bufsize.txt",
            position: 0,
            normalized: true,
        };
        let all = file_class(18, &f).unwrap();
        assert!(fixed_len(1, 18, all.len()) < all.len());
        assert_eq!(fixed_len(1, 18, all.len()), 104);
        let alt = file_class(21, &f).unwrap();
        assert_eq!(fixed_len(1, 21, alt.len()), 8);
        let basic = file_class(4, &f).unwrap();
        assert_eq!(fixed_len(1, 4, basic.len()), basic.len());
        assert_eq!(fixed_len(2, 5, 30), 16);
        assert_eq!(fixed_len(2, 3, 24), 24);
    }

    /// The descriptor holds the parts asked for, each where its offset
    /// says: S-1-22-1-uid, S-1-22-2-gid and a DACL of one ACE allowing
    /// everyone FILE_ALL_ACCESS.
    #[test]
    fn a_security_descriptor_holds_the_parts_asked_for() {
        let m = Meta {
            uid: 1000,
            gid: 100,
            ..Meta::default()
        };
        let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let sd = security_descriptor(&m, 0x7);
        assert_eq!(sd[0], 1);
        assert_eq!(u16::from_le_bytes([sd[2], sd[3]]), 0x8004);
        let (owner, group, sacl, dacl) = (
            u32_at(&sd, 4) as usize,
            u32_at(&sd, 8) as usize,
            u32_at(&sd, 12),
            u32_at(&sd, 16) as usize,
        );
        assert_eq!(sacl, 0);
        assert_eq!(&sd[owner..owner + 8], &[1, 2, 0, 0, 0, 0, 0, 22]);
        assert_eq!(u32_at(&sd, owner + 8), 1);
        assert_eq!(u32_at(&sd, owner + 12), 1000);
        assert_eq!(u32_at(&sd, group + 8), 2);
        assert_eq!(u32_at(&sd, group + 12), 100);
        // ACL: revision 2, size, one ACE; the ACE allows, all access,
        // to S-1-1-0.
        assert_eq!(sd[dacl], 2);
        let acl_len = usize::from(u16::from_le_bytes([sd[dacl + 2], sd[dacl + 3]]));
        assert_eq!(dacl + acl_len, sd.len());
        assert_eq!(u16::from_le_bytes([sd[dacl + 4], sd[dacl + 5]]), 1);
        assert_eq!(sd[dacl + 8], 0);
        assert_eq!(u32_at(&sd, dacl + 12), 0x001F_01FF);
        assert_eq!(&sd[dacl + 16..], &[1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0]);

        let owner_only = security_descriptor(&m, 0x1);
        assert_eq!(u16::from_le_bytes([owner_only[2], owner_only[3]]), 0x8000);
        assert_eq!(u32_at(&owner_only, 8), 0);
        assert_eq!(u32_at(&owner_only, 16), 0);
        assert_eq!(owner_only.len(), 20 + 16);
        assert_eq!(security_descriptor(&m, 0x8).len(), 20);
    }
}
