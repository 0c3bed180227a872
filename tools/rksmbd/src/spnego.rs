//! Just enough SPNEGO (RFC 4178) to carry NTLMSSP: the server's
//! NegTokenInit hint for the NEGOTIATE response, the NTLMSSP token (and
//! the mechTypes list and mechListMIC) out of a client's NegTokenInit or
//! NegTokenResp, and the server's NegTokenResp answers. A bounded DER
//! reader; anything else is a typed error.

use crate::wire::WireError;

/// The NTLMSSP mechanism OID 1.3.6.1.4.1.311.2.2.10, DER-encoded.
const NTLMSSP_OID: &[u8] = &[
    0x06, 0x0A, 0x2B, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0A,
];
/// The SPNEGO OID 1.3.6.1.5.5.2, DER-encoded.
const SPNEGO_OID: &[u8] = &[0x06, 0x06, 0x2B, 0x06, 0x01, 0x05, 0x05, 0x02];

/// One DER element: its tag, its contents, and the whole encoding.
struct Tlv<'a> {
    tag: u8,
    value: &'a [u8],
    raw: &'a [u8],
}

/// Reads one element from the front of `buf`, returning it and the rest.
fn tlv(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), WireError> {
    let bad = WireError::Bad("SPNEGO DER");
    let (&tag, rest) = buf.split_first().ok_or(bad.clone())?;
    let (&first, rest) = rest.split_first().ok_or(bad.clone())?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad);
        }
        let (lb, rest) = rest.split_at(n);
        (
            lb.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b)),
            rest,
        )
    };
    if rest.len() < len {
        return Err(bad);
    }
    let (value, after) = rest.split_at(len);
    let header = buf.len() - rest.len();
    let raw = buf.get(..header + len).ok_or(bad)?;
    Ok((Tlv { tag, value, raw }, after))
}

/// The elements of a constructed value.
fn children(mut buf: &[u8]) -> Result<Vec<Tlv<'_>>, WireError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (t, rest) = tlv(buf)?;
        out.push(t);
        buf = rest;
        if out.len() > 64 {
            return Err(WireError::Bad("SPNEGO: too many elements"));
        }
    }
    Ok(out)
}

fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = value.len();
    if n < 0x80 {
        out.push(u8::try_from(n).unwrap_or(0));
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, u8::try_from(n).unwrap_or(0)]);
    } else {
        out.push(0x82);
        out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
    }
    out.extend_from_slice(value);
    out
}

/// What a client's SPNEGO token carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientToken {
    /// The NTLMSSP message.
    pub ntlm: Vec<u8>,
    /// The DER encoding of the mechTypes list (NegTokenInit only).
    pub mech_types: Option<Vec<u8>>,
    /// Whether NTLMSSP is the client's first mechanism.
    pub ntlm_preferred: bool,
    /// The mechListMIC, if any.
    pub mic: Option<Vec<u8>>,
}

/// Unwraps a client's security blob: a NegTokenInit, a NegTokenResp, or a
/// raw NTLMSSP message.
pub fn parse_client(blob: &[u8]) -> Result<ClientToken, WireError> {
    if blob.starts_with(crate::ntlm::SIGNATURE) {
        return Ok(ClientToken {
            ntlm: blob.to_vec(),
            ..ClientToken::default()
        });
    }
    let (outer, _) = tlv(blob)?;
    let seq = match outer.tag {
        // [APPLICATION 0] { OID spnego, [0] NegTokenInit }
        0x60 => {
            let parts = children(outer.value)?;
            let init = parts
                .iter()
                .find(|t| t.tag == 0xA0)
                .ok_or(WireError::Bad("SPNEGO: no NegTokenInit"))?;
            let (s, _) = tlv(init.value)?;
            s
        }
        // [1] NegTokenResp
        0xA1 => tlv(outer.value)?.0,
        _ => return Err(WireError::Bad("SPNEGO token")),
    };
    if seq.tag != 0x30 {
        return Err(WireError::Bad("SPNEGO sequence"));
    }
    let mut tok = ClientToken::default();
    for field in children(seq.value)? {
        let (inner, _) = tlv(field.value)?;
        match (outer.tag, field.tag) {
            (0x60, 0xA0) => {
                let mechs = children(inner.value)?;
                tok.ntlm_preferred = mechs.first().is_some_and(|m| m.raw == NTLMSSP_OID);
                tok.mech_types = Some(inner.raw.to_vec());
            }
            (0x60, 0xA2) | (0xA1, 0xA2) if inner.tag == 0x04 => tok.ntlm = inner.value.to_vec(),
            (0x60, 0xA3) | (0xA1, 0xA3) if inner.tag == 0x04 => {
                tok.mic = Some(inner.value.to_vec())
            }
            _ => {}
        }
    }
    if tok.ntlm.is_empty() {
        return Err(WireError::Bad("SPNEGO: no NTLMSSP token"));
    }
    Ok(tok)
}

/// The NegTokenInit hint a server puts in its NEGOTIATE response: NTLMSSP
/// is the one mechanism.
pub fn init_hint() -> Vec<u8> {
    let mechs = der(0x30, NTLMSSP_OID);
    let init = der(0x30, &der(0xA0, &mechs));
    let mut inner = SPNEGO_OID.to_vec();
    inner.extend_from_slice(&der(0xA0, &init));
    der(0x60, &inner)
}

/// NegTokenResp: accept-incomplete with the CHALLENGE message.
pub fn challenge_response(ntlm: &[u8]) -> Vec<u8> {
    let mut seq = der(0xA0, &der(0x0A, &[1]));
    seq.extend_from_slice(&der(0xA1, NTLMSSP_OID));
    seq.extend_from_slice(&der(0xA2, &der(0x04, ntlm)));
    der(0xA1, &der(0x30, &seq))
}

/// NegTokenResp: accept-completed, with our mechListMIC if any.
pub fn accept_completed(mic: Option<&[u8]>) -> Vec<u8> {
    let mut seq = der(0xA0, &der(0x0A, &[0]));
    if let Some(m) = mic {
        seq.extend_from_slice(&der(0xA3, &der(0x04, m)));
    }
    der(0xA1, &der(0x30, &seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_init(ntlm: &[u8]) -> Vec<u8> {
        let mechs = der(0x30, NTLMSSP_OID);
        let mut seq = der(0xA0, &mechs);
        seq.extend_from_slice(&der(0xA2, &der(0x04, ntlm)));
        let mut inner = SPNEGO_OID.to_vec();
        inner.extend_from_slice(&der(0xA0, &der(0x30, &seq)));
        der(0x60, &inner)
    }

    #[test]
    fn unwraps_init_and_resp() {
        let ntlm = b"NTLMSSP\0\x01\0\0\0rest".to_vec();
        let t = parse_client(&client_init(&ntlm)).unwrap();
        assert_eq!(t.ntlm, ntlm);
        assert!(t.ntlm_preferred);
        assert_eq!(t.mech_types, Some(der(0x30, NTLMSSP_OID)));
        let mut seq = der(0xA2, &der(0x04, &ntlm));
        seq.extend_from_slice(&der(0xA3, &der(0x04, &[1, 2, 3])));
        let t = parse_client(&der(0xA1, &der(0x30, &seq))).unwrap();
        assert_eq!((t.ntlm, t.mic), (ntlm.clone(), Some(vec![1, 2, 3])));
        assert_eq!(parse_client(&ntlm).unwrap().ntlm, ntlm);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = client_init(b"NTLMSSP\0xyz");
        for n in 0..good.len() {
            let _ = parse_client(&good[..n]);
        }
        assert!(parse_client(&[0x60, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]).is_err());
        assert!(parse_client(&[]).is_err());
        assert!(parse_client(&init_hint()).is_err());
    }
}
