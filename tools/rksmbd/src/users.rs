//! The users file: Samba's smbpasswd format, one user per line,
//! `name:uid:LMHASH:NTHASH:[FLAGS]:LCT-HEX:`. Only the NT hash (MD4 of the
//! UTF-16LE password) is used; LM hashes are ignored and plain passwords
//! are never stored. Accounts that Samba would not log on as users cannot
//! log on: flagged `D` (disabled), `L` (auto-locked), `W`, `S` or `I`
//! (workstation, server, interdomain trust accounts), with no NT hash
//! (`XXXX…`, `NO PASSWORD…`), or with the empty password's NT hash unless
//! flagged `N` (no password required). Names match case-insensitively, as
//! Windows user names do.
//!
//! An NT hash is as good as the password for NTLMv2, so [`Users::load`]
//! refuses a file that group or others may read or write (as ssh does for
//! keys): `(umask 077; rksmbd hash-password NAME >> FILE)` makes one right.

use md4::{Digest, Md4};

/// A user's NT hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtHash(pub [u8; 16]);

/// Why the users file was refused.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The file could not be read.
    #[error("reading the users file")]
    Read(#[from] std::io::Error),
    /// Group or others may read or write the file: its NT hashes are as
    /// good as passwords.
    #[error(
        "users file {path} is readable or writable by group or others (mode {mode:04o}); chmod 600 {path}"
    )]
    Exposed {
        /// The file as named.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not in smbpasswd format.
    #[error("users file line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

/// Why `rksmbd hash-password` printed no line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    /// Standard input ended before a line (`< /dev/null`).
    #[error("no password on stdin (its first line is the password)")]
    Missing,
    /// The first line is empty: its hash would log on with no password.
    #[error("refusing an empty password (its NT hash logs on with no password)")]
    Empty,
    /// Standard input could not be read.
    #[error("reading the password from stdin: {0}")]
    Read(std::io::ErrorKind),
}

/// The flags (smbpasswd's `[…]` field) of an account Samba does not log
/// on as a user: `D` disabled, `L` auto-locked, `W` / `S` / `I`
/// workstation, server and interdomain trust accounts.
const NO_LOGON_FLAGS: [char; 5] = ['D', 'L', 'W', 'S', 'I'];

/// The NT hash of the empty password.
const EMPTY_PASSWORD: NtHash = NtHash([
    0x31, 0xD6, 0xCF, 0xE0, 0xD1, 0x6A, 0xE9, 0x31, 0xB7, 0x3C, 0x59, 0xD7, 0xE0, 0xC0, 0x89, 0xC0,
]);

/// The accounts that may log on.
#[derive(Debug, Clone, Default)]
pub struct Users(Vec<(String, NtHash)>);

fn hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Users {
    /// Reads and parses a users file, refusing it ([`UsersError::Exposed`])
    /// when its mode has any group or other bit. The mode checked is that
    /// of the file opened and read (fstat), not of whatever the path named
    /// a moment earlier.
    pub fn load(path: &std::path::Path) -> Result<Users, UsersError> {
        use std::io::Read as _;
        use std::os::unix::fs::PermissionsExt as _;
        let mut file = std::fs::File::open(path)?;
        let mode = file.metadata()?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(UsersError::Exposed {
                path: path.display().to_string(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        Users::parse(&text)
    }

    /// Parses smbpasswd text. Blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Users, UsersError> {
        let mut users = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why| UsersError::Line { line: i + 1, why };
            let fields: Vec<&str> = line.split(':').collect();
            let [name, uid, _lm, nt, flags, ..] = fields.as_slice() else {
                return Err(bad("expected name:uid:LMHASH:NTHASH:[FLAGS]:LCT:"));
            };
            if name.is_empty() {
                return Err(bad("empty user name"));
            }
            if uid.parse::<u32>().is_err() {
                return Err(bad("uid is not a number"));
            }
            if !(flags.starts_with('[') && flags.ends_with(']')) {
                return Err(bad("flags must be in brackets"));
            }
            if flags.contains(NO_LOGON_FLAGS) {
                continue;
            }
            match hex16(nt) {
                Some(h) if NtHash(h) == EMPTY_PASSWORD && !flags.contains('N') => {
                    // Before (review rvcrypto), `hash-password` read an
                    // empty stdin as the empty password, whose account
                    // then logged on with none.
                    tracing::warn!(
                        line = i + 1,
                        user = %name,
                        "users file: account with the empty password's hash and no N flag; \
                         it cannot log on"
                    );
                    continue;
                }
                Some(h) => users.push(((*name).to_owned(), NtHash(h))),
                None if nt.starts_with('X') || nt.starts_with("NO PASSWORD") => continue,
                None => return Err(bad("NT hash must be 32 hex digits")),
            }
        }
        Ok(Users(users))
    }

    /// The account named `user` (any case) and its hash.
    pub fn lookup(&self, user: &str) -> Option<(&str, NtHash)> {
        let want = user.to_lowercase();
        self.0
            .iter()
            .find(|(n, _)| n.to_lowercase() == want)
            .map(|(n, h)| (n.as_str(), *h))
    }

    /// How many accounts may log on.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No account may log on.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Creates (or empties) the users file `path` as [`Users::load`] accepts
/// it: mode 0600 whatever the umask, an existing file set to 0600 once
/// emptied. What the tests, the demo and the bench write their
/// `hash-password` lines into.
pub fn create_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// The NT hash of a password: MD4 of its UTF-16LE encoding.
pub fn nt_hash(password: &str) -> NtHash {
    let mut h = Md4::new();
    h.update(crate::wire::to_utf16(password));
    NtHash(h.finalize().into())
}

/// The password `rksmbd hash-password` reads: the first line of `input`
/// without its line end; an empty one, or none, is refused.
pub fn read_password(input: &mut impl std::io::BufRead) -> Result<String, PasswordError> {
    let mut pw = String::new();
    match input.read_line(&mut pw) {
        Ok(0) => return Err(PasswordError::Missing),
        Ok(_) => {}
        Err(e) => return Err(PasswordError::Read(e.kind())),
    }
    let pw = pw.trim_end_matches(['\n', '\r']);
    if pw.is_empty() {
        return Err(PasswordError::Empty);
    }
    Ok(pw.to_owned())
}

/// An smbpasswd line for `name` with `password` (what `rksmbd
/// hash-password` prints).
pub fn line(name: &str, uid: u32, password: &str) -> String {
    let hex: String = nt_hash(password)
        .0
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    let lct = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{name}:{uid}:XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:{hex}:[U          ]:LCT-{lct:08X}:\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_nt_hash() {
        // MS-NLMP 4.2.2.1.2: NTOWFv1("Password").
        let want = hex16("A4F49C406510BDCAB6824EE7C30FD852").unwrap();
        assert_eq!(nt_hash("Password").0, want);
    }

    /// A users file group or others may read or write is refused with the
    /// chmod that fixes it; 0600 and 0400 are read.
    #[test]
    fn a_users_file_group_or_others_can_reach_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("rksmbd-users-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("smbpasswd");
        std::fs::write(&path, line("alice", 1000, "pw")).unwrap();
        let shown = path.display().to_string();
        for mode in [0o644, 0o640, 0o604, 0o620, 0o602, 0o610, 0o601] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = Users::load(&path).unwrap_err();
            assert!(
                matches!(err, UsersError::Exposed { mode: m, .. } if m == mode),
                "{mode:o}: {err}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "users file {shown} is readable or writable by group or others \
                     (mode {mode:04o}); chmod 600 {shown}"
                )
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(Users::load(&path).unwrap().len(), 1, "{mode:o}");
        }
        // create_file makes a file load accepts, an existing 0644 one too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let fresh = dir.join("fresh");
        for p in [&path, &fresh] {
            use std::io::Write as _;
            let mut f = create_file(p).unwrap();
            f.write_all(line("bob", 1001, "pw").as_bytes()).unwrap();
            assert_eq!(Users::load(p).unwrap().len(), 1, "{}", p.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_smbpasswd_and_refuses_garbage() {
        let text = format!(
            "# comment\n{}bob:1001:XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:[U          ]:LCT-00000000:\n\
             carol:1002:XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX:A4F49C406510BDCAB6824EE7C30FD852:[DU         ]:LCT-00000000:\n",
            line("Alice", 1000, "pw")
        );
        let u = Users::parse(&text).unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(u.lookup("ALICE").map(|x| x.0), Some("Alice"));
        assert_eq!(u.lookup("ALICE").map(|x| x.1), Some(nt_hash("pw")));
        assert!(u.lookup("bob").is_none() && u.lookup("carol").is_none());
        for bad in ["x", "a:b:c:d:e:f:", "a:1:X:1234:[U]:L:", ":1:X:X:[U]:L:"] {
            assert!(Users::parse(bad).is_err(), "{bad}");
        }
    }

    /// Accounts Samba does not log on as users do not log on here either
    /// (review rvcrypto: only `D` was honoured, so `carol [LU]`, locked,
    /// and `host$ [W]`, a workstation trust account, logged on).
    #[test]
    fn locked_and_trust_accounts_cannot_log_on() {
        let pw = line("x", 1, "pw");
        let with = |name: &str, flags: &str| {
            pw.replacen("x:1:", &format!("{name}:1:"), 1)
                .replacen("[U          ]", flags, 1)
        };
        let text: String = [
            with("alice", "[U          ]"),
            with("xavier", "[UX         ]"),
            with("carol", "[LU         ]"),
            with("dave", "[DU         ]"),
            with("host$", "[W          ]"),
            with("server$", "[S          ]"),
            with("domain$", "[I          ]"),
        ]
        .concat();
        let u = Users::parse(&text).unwrap();
        assert!(u.lookup("alice").is_some() && u.lookup("xavier").is_some());
        for name in ["carol", "dave", "host$", "server$", "domain$"] {
            assert!(u.lookup(name).is_none(), "{name} logs on");
        }
        assert_eq!(u.len(), 2);
    }

    /// An account with the empty password's NT hash logs on only when
    /// flagged `N` (no password required), as Samba has it (review
    /// rvcrypto: `hash-password eve < /dev/null` made one that logged on
    /// with no password).
    #[test]
    fn the_empty_passwords_hash_logs_on_only_flagged_n() {
        assert_eq!(nt_hash(""), EMPTY_PASSWORD);
        let eve = line("eve", 1, "");
        let u = Users::parse(&eve).unwrap();
        assert!(u.lookup("eve").is_none() && u.is_empty());
        let u = Users::parse(&eve.replacen("[U          ]", "[NU         ]", 1)).unwrap();
        assert_eq!(u.lookup("eve").map(|x| x.1), Some(EMPTY_PASSWORD));
    }

    /// hash-password's input: the first line, its line end taken off; an
    /// empty line or none at all is refused.
    #[test]
    fn hash_password_refuses_an_empty_password() {
        let read = |s: &str| read_password(&mut std::io::Cursor::new(s.as_bytes()));
        assert_eq!(read("pw\nmore\n"), Ok("pw".to_owned()));
        assert_eq!(read("pw\r\n"), Ok("pw".to_owned()));
        assert_eq!(read("pw"), Ok("pw".to_owned()));
        assert_eq!(read(""), Err(PasswordError::Missing));
        assert_eq!(read("\n"), Err(PasswordError::Empty));
        assert_eq!(read("\r\n"), Err(PasswordError::Empty));
    }
}
