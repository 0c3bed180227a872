//! The server side of NTLMSSP (MS-NLMP): the CHALLENGE message, the check
//! of an AUTHENTICATE message's NTLMv2 response against a user's NT hash,
//! its MIC, the key exchange (RC4) that yields the exported session key,
//! and NTLMSSP message signatures (for SPNEGO's mechListMIC).
//!
//! Only NTLMv2 with extended session security is accepted; LM and NTLMv1
//! responses, and anonymous logons, are refused.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use rc4::{consts::U16, KeyInit, Rc4, StreamCipher};

use crate::users::{NtHash, Users};
use crate::wire::{self, Reader, WireError, Writer};

type HmacMd5 = Hmac<Md5>;

/// `NTLMSSP\0`.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
const REQUEST_TARGET: u32 = 0x0000_0004;
const NEGOTIATE_SIGN: u32 = 0x0000_0010;
const NEGOTIATE_SEAL: u32 = 0x0000_0020;
const NEGOTIATE_NTLM: u32 = 0x0000_0200;
const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
const TARGET_TYPE_SERVER: u32 = 0x0002_0000;
const EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
const NEGOTIATE_VERSION: u32 = 0x0200_0000;
const NEGOTIATE_128: u32 = 0x2000_0000;
const NEGOTIATE_KEY_EXCH: u32 = 0x4000_0000;
const NEGOTIATE_56: u32 = 0x8000_0000;

/// The longest NEGOTIATE message taken. A client's is 32 bytes of fixed
/// fields, an 8-byte version and at most a domain and a workstation name
/// (a few dozen bytes); the NEGOTIATE is kept until the AUTHENTICATE (for
/// its MIC), and before this bound a client could park 64 KiB of it in
/// every half-made session (adversarial review: 120 connections held
/// 1 GB).
pub const MAX_NEGOTIATE: usize = 1024;

/// Why a logon failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The message could not be decoded.
    #[error("malformed NTLMSSP message")]
    Malformed(#[from] WireError),
    /// No such user, or the proof does not match its hash.
    #[error("logon failure for {0:?}")]
    LogonFailure(String),
    /// A response type rksmbd does not accept (LM, NTLMv1, anonymous).
    #[error("unsupported NTLM response ({0})")]
    Unsupported(&'static str),
}

/// State between CHALLENGE and AUTHENTICATE.
#[derive(Debug, Clone)]
pub struct Pending {
    negotiate: Vec<u8>,
    challenge: Vec<u8>,
    server_challenge: [u8; 8],
}

/// A successful logon.
#[derive(Debug, Clone)]
pub struct LoggedOn {
    /// The user as named in the users file.
    pub user: String,
    /// The exported session key.
    pub session_key: [u8; 16],
    /// Negotiated NTLMSSP flags.
    pub flags: u32,
}

/// Random bytes for challenges, salts and GUIDs, from the OS CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    if getrandom::getrandom(&mut out).is_err() {
        // No OS randomness is a broken host; fall back to uuid's generator
        // rather than serve predictable challenges.
        for chunk in out.chunks_mut(16) {
            let r = uuid::Uuid::new_v4();
            let n = chunk.len();
            chunk.copy_from_slice(&r.as_bytes()[..n]);
        }
    }
    out
}

/// Windows FILETIME now.
pub fn filetime_now() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() + 11_644_473_600) * 10_000_000 + u64::from(d.subsec_nanos() / 100)
}

fn av_pair(w: &mut Writer, id: u16, value: &[u8]) {
    w.u16(id).u16(wire::len16(value.len())).bytes(value);
}

/// Answers a NEGOTIATE message with a CHALLENGE message.
pub fn challenge(negotiate: &[u8], server: &str) -> Result<(Pending, Vec<u8>), AuthError> {
    if negotiate.len() > MAX_NEGOTIATE {
        return Err(WireError::Bad("NTLMSSP NEGOTIATE too long").into());
    }
    let mut r = Reader::new(negotiate);
    if r.array::<8>("ntlmssp signature")? != *SIGNATURE || r.u32("message type")? != 1 {
        return Err(WireError::Bad("NTLMSSP NEGOTIATE").into());
    }
    let client_flags = r.u32("negotiate flags")?;
    let flags = (client_flags
        & (NEGOTIATE_UNICODE
            | NEGOTIATE_SIGN
            | NEGOTIATE_SEAL
            | NEGOTIATE_ALWAYS_SIGN
            | NEGOTIATE_128
            | NEGOTIATE_KEY_EXCH
            | NEGOTIATE_56
            | NEGOTIATE_VERSION))
        | NEGOTIATE_UNICODE
        | REQUEST_TARGET
        | NEGOTIATE_NTLM
        | TARGET_TYPE_SERVER
        | EXTENDED_SESSIONSECURITY
        | NEGOTIATE_TARGET_INFO;
    let server_challenge: [u8; 8] = random_bytes();
    let name = wire::to_utf16(&server.to_uppercase());
    let mut info = Writer::new();
    av_pair(&mut info, 2, &name); // MsvAvNbDomainName
    av_pair(&mut info, 1, &name); // MsvAvNbComputerName
    av_pair(&mut info, 4, &name); // MsvAvDnsDomainName
    av_pair(&mut info, 3, &name); // MsvAvDnsComputerName
    av_pair(&mut info, 7, &filetime_now().to_le_bytes()); // MsvAvTimestamp
    av_pair(&mut info, 0, &[]); // MsvAvEOL
    let payload_at = 56u32;
    let mut w = Writer::new();
    w.bytes(SIGNATURE).u32(2);
    w.u16(wire::len16(name.len()))
        .u16(wire::len16(name.len()))
        .u32(payload_at);
    w.u32(flags).bytes(&server_challenge).u64(0);
    w.u16(wire::len16(info.len()))
        .u16(wire::len16(info.len()))
        .u32(payload_at + wire::len32(name.len()));
    // Version: 6.1 build 7601, NTLMSSP revision 15.
    w.bytes(&[6, 1, 0xB1, 0x1D, 0, 0, 0, 15]);
    w.bytes(&name).bytes(&info.0);
    Ok((
        Pending {
            negotiate: negotiate.to_vec(),
            challenge: w.0.clone(),
            server_challenge,
        },
        w.0,
    ))
}

/// A (length, offset) field of an NTLMSSP message, resolved.
fn field<'a>(msg: &'a [u8], r: &mut Reader<'_>, what: &'static str) -> Result<&'a [u8], WireError> {
    let len = r.u16(what)?;
    r.u16(what)?;
    let off = r.u32(what)?;
    wire::buffer(msg, off, u32::from(len), what)
}

fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut out = [0u8; 16];
    if let Ok(mut m) = <HmacMd5 as Mac>::new_from_slice(key) {
        for p in parts {
            m.update(p);
        }
        out.copy_from_slice(&m.finalize().into_bytes());
    }
    out
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Whether the NTLMv2 client challenge's AV pairs announce a MIC.
fn mic_present(client_blob: &[u8]) -> bool {
    // NTLMv2_CLIENT_CHALLENGE: 28 bytes of fixed fields, then AV pairs.
    let mut r = Reader::new(client_blob);
    if r.skip(28, "client challenge").is_err() {
        return false;
    }
    while let (Ok(id), Ok(len)) = (r.u16("av id"), r.u16("av len")) {
        let Ok(v) = r.bytes(usize::from(len), "av value") else {
            return false;
        };
        match id {
            0 => return false,
            6 => {
                let f = <[u8; 4]>::try_from(v).map(u32::from_le_bytes).unwrap_or(0);
                return f & 0x2 != 0;
            }
            _ => {}
        }
    }
    false
}

/// The fields of an AUTHENTICATE message that a logon checks.
struct AuthFields<'a> {
    nt: &'a [u8],
    domain: String,
    user: String,
    enc_key: &'a [u8],
    flags: u32,
}

fn auth_fields(auth: &[u8]) -> Result<AuthFields<'_>, WireError> {
    let mut r = Reader::new(auth);
    if r.array::<8>("ntlmssp signature")? != *SIGNATURE || r.u32("message type")? != 3 {
        return Err(WireError::Bad("NTLMSSP AUTHENTICATE"));
    }
    let _lm = field(auth, &mut r, "lm response")?;
    let nt = field(auth, &mut r, "nt response")?;
    let domain = field(auth, &mut r, "domain")?;
    let user = field(auth, &mut r, "user")?;
    let _workstation = field(auth, &mut r, "workstation")?;
    let enc_key = field(auth, &mut r, "session key")?;
    let flags = r.u32("flags")?;
    let unicode = flags & NEGOTIATE_UNICODE != 0;
    let text = |b: &[u8], what| -> Result<String, WireError> {
        if unicode {
            wire::utf16(b, what)
        } else {
            Ok(String::from_utf8_lossy(b).into_owned())
        }
    };
    Ok(AuthFields {
        nt,
        domain: text(domain, "domain name")?,
        user: text(user, "user name")?,
        enc_key,
        flags,
    })
}

/// The user an AUTHENTICATE message names, before anything is checked
/// (failed logons are counted per user: [`crate::logons`]); empty when
/// it does not decode.
pub fn user_of(auth: &[u8]) -> String {
    auth_fields(auth).map(|f| f.user).unwrap_or_default()
}

/// Checks an AUTHENTICATE message against the users file.
pub fn authenticate(p: &Pending, auth: &[u8], users: &Users) -> Result<LoggedOn, AuthError> {
    let AuthFields {
        nt,
        domain,
        user,
        enc_key,
        flags,
    } = auth_fields(auth)?;
    if user.is_empty() {
        return Err(AuthError::Unsupported("anonymous"));
    }
    if nt.len() <= 24 {
        return Err(AuthError::Unsupported("NTLMv1"));
    }
    let (proof, blob) = nt.split_at(16);
    let Some((name, hash)) = users.lookup(&user) else {
        return Err(AuthError::LogonFailure(user));
    };
    let NtHash(hash) = hash;
    let who = wire::to_utf16(&(user.to_uppercase() + &domain));
    let key_nt = hmac_md5(&hash, &[&who]);
    let want = hmac_md5(&key_nt, &[&p.server_challenge, blob]);
    if !ct_eq(&want, proof) {
        return Err(AuthError::LogonFailure(user));
    }
    let base_key = hmac_md5(&key_nt, &[proof]);
    let session_key = if flags & NEGOTIATE_KEY_EXCH != 0 {
        let mut k = <[u8; 16]>::try_from(enc_key)
            .map_err(|_| WireError::Bad("encrypted random session key"))?;
        let mut rc4 = Rc4::<U16>::new((&base_key).into());
        rc4.apply_keystream(&mut k);
        k
    } else {
        base_key
    };
    if mic_present(blob) {
        // The MIC sits after the version field at offset 72.
        let mic = wire::slice(auth, 72, 16, "mic")?;
        let mut zeroed = auth.to_vec();
        if let Some(m) = zeroed.get_mut(72..88) {
            m.fill(0);
        }
        let want = hmac_md5(&session_key, &[&p.negotiate, &p.challenge, &zeroed]);
        if !ct_eq(&want, mic) {
            return Err(AuthError::LogonFailure(user));
        }
    }
    Ok(LoggedOn {
        user: name.to_owned(),
        session_key,
        flags,
    })
}

/// Which way an NTLMSSP signature goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    FromClient,
    /// Server to client.
    FromServer,
}

/// The NTLMSSP signature (MS-NLMP 3.4.4.2, extended session security) of
/// the first message in `dir` (sequence number 0), as SPNEGO's
/// mechListMIC uses it.
pub fn first_signature(l: &LoggedOn, dir: Direction, msg: &[u8]) -> [u8; 16] {
    let (sign_magic, seal_magic): (&[u8], &[u8]) = match dir {
        Direction::FromClient => (
            b"session key to client-to-server signing key magic constant\0",
            b"session key to client-to-server sealing key magic constant\0",
        ),
        Direction::FromServer => (
            b"session key to server-to-client signing key magic constant\0",
            b"session key to server-to-client sealing key magic constant\0",
        ),
    };
    let md5 = |a: &[u8], b: &[u8]| -> [u8; 16] {
        let mut h = Md5::new();
        h.update(a);
        h.update(b);
        h.finalize().into()
    };
    let sign_key = md5(&l.session_key, sign_magic);
    let seal_key = md5(&l.session_key, seal_magic);
    let seq = 0u32.to_le_bytes();
    let mac = hmac_md5(&sign_key, &[&seq, msg]);
    let mut checksum = [0u8; 8];
    checksum.copy_from_slice(&mac[..8]);
    if l.flags & NEGOTIATE_KEY_EXCH != 0 {
        let mut rc4 = Rc4::<U16>::new((&seal_key).into());
        rc4.apply_keystream(&mut checksum);
    }
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&1u32.to_le_bytes());
    out[4..12].copy_from_slice(&checksum);
    out[12..].copy_from_slice(&seq);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's side of NTLMv2, written from MS-NLMP 3.3.2, to check
    /// the server against.
    fn client_auth(p: &Pending, user: &str, pass: &str, mic: bool) -> Vec<u8> {
        let hash = crate::users::nt_hash(pass).0;
        let key_nt = hmac_md5(&hash, &[&wire::to_utf16(&(user.to_uppercase() + "DOM"))]);
        let mut blob = Writer::new();
        blob.bytes(&[1, 1, 0, 0, 0, 0, 0, 0]).u64(filetime_now());
        blob.bytes(&[9; 8]).u32(0);
        if mic {
            blob.u16(6).u16(4).u32(2);
        }
        blob.u16(0).u16(0).u32(0);
        let proof = hmac_md5(&key_nt, &[&p.server_challenge, &blob.0]);
        let base = hmac_md5(&key_nt, &[&proof]);
        let exported = [5u8; 16];
        let mut enc = exported;
        Rc4::<U16>::new((&base).into()).apply_keystream(&mut enc);
        let mut nt = proof.to_vec();
        nt.extend_from_slice(&blob.0);
        let (u, d) = (wire::to_utf16(user), wire::to_utf16("DOM"));
        let mut w = Writer::new();
        w.bytes(SIGNATURE).u32(3);
        let base_off = 88u32;
        let mut off = base_off;
        let mut payload = Vec::new();
        for f in [&[][..], &nt, &d, &u, &[][..], &enc] {
            w.u16(wire::len16(f.len()))
                .u16(wire::len16(f.len()))
                .u32(off);
            off += wire::len32(f.len());
            payload.extend_from_slice(f);
        }
        w.u32(NEGOTIATE_UNICODE | NEGOTIATE_KEY_EXCH | EXTENDED_SESSIONSECURITY);
        w.bytes(&[0; 8]).bytes(&[0; 16]).bytes(&payload);
        if mic {
            let m = hmac_md5(&exported, &[&p.negotiate, &p.challenge, &w.0]);
            w.0[72..88].copy_from_slice(&m);
        }
        w.0
    }

    fn negotiate() -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(SIGNATURE).u32(1).u32(0xE208_8297).bytes(&[0; 16]);
        w.0
    }

    #[test]
    fn ntlmv2_right_and_wrong_password() {
        let users = Users::parse(&crate::users::line("alice", 1000, "secret")).unwrap();
        let (p, chal) = challenge(&negotiate(), "rksmbd").unwrap();
        assert_eq!(&chal[..8], SIGNATURE);
        for mic in [false, true] {
            let ok = authenticate(&p, &client_auth(&p, "Alice", "secret", mic), &users).unwrap();
            assert_eq!(ok.user, "alice");
            assert_eq!(ok.session_key, [5; 16]);
            assert!(matches!(
                authenticate(&p, &client_auth(&p, "alice", "wrong", mic), &users),
                Err(AuthError::LogonFailure(_))
            ));
        }
        // A tampered MIC fails.
        let mut bad = client_auth(&p, "alice", "secret", true);
        bad[80] ^= 1;
        assert!(authenticate(&p, &bad, &users).is_err());
        // Garbage never panics.
        for n in 0..bad.len() {
            let _ = authenticate(&p, &bad[..n], &users);
        }
    }
}
