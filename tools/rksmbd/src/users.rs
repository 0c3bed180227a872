//! The users file: Samba's smbpasswd format, one user per line,
//! `name:uid:LMHASH:NTHASH:[FLAGS]:LCT-HEX:`. Only the NT hash (MD4 of the
//! UTF-16LE password) is used; LM hashes are ignored and plain passwords
//! are never stored. Accounts flagged `D` (disabled) or with no NT hash
//! (`XXXX…`, `NO PASSWORD…`) cannot log on. Names match case-insensitively,
//! as Windows user names do.

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
    /// A line is not in smbpasswd format.
    #[error("users file line {line}: {why}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: &'static str,
    },
}

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
    /// Reads and parses a users file.
    pub fn load(path: &std::path::Path) -> Result<Users, UsersError> {
        Users::parse(&std::fs::read_to_string(path)?)
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
            if flags.contains('D') {
                continue;
            }
            match hex16(nt) {
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

/// The NT hash of a password: MD4 of its UTF-16LE encoding.
pub fn nt_hash(password: &str) -> NtHash {
    let mut h = Md4::new();
    h.update(crate::wire::to_utf16(password));
    NtHash(h.finalize().into())
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
}
