//! Input checks shared by the four services: resource ids (AIP-122), IP prefixes, MAC addresses,
//! page tokens and the status helpers every handler uses.

use std::fmt::Write as _;

use tonic::Status;
use xpu_proto::opi::opinetcommon::{self as common, ip_address::V4OrV6};

/// `INVALID_ARGUMENT: missing required field: <path>` (the wording of `fieldbehavior`).
pub(crate) fn missing(path: &str) -> Status {
    Status::invalid_argument(format!("missing required field: {path}"))
}

pub(crate) fn not_found(name: &str) -> Status {
    Status::not_found(format!("unable to find key {name}"))
}

/// A user-settable resource id as AIP-122 (and `resourceid.ValidateUserSettable`) defines it:
/// 4–63 characters of `[a-z0-9-]`, starting with a letter, not ending with a hyphen, and not
/// shaped like a UUID (those are reserved for system-generated ids).
pub(crate) fn validate_user_id(field: &str, id: &str) -> Result<(), Status> {
    let bad = |why: &str| Err(Status::invalid_argument(format!("{field} {id:?} is not a valid resource id: {why}")));
    if id.len() < 4 || id.len() > 63 {
        return bad("it must be between 4 and 63 characters long");
    }
    if let Some((pos, c)) = id.char_indices().find(|(_, c)| !matches!(c, 'a'..='z' | '0'..='9' | '-')) {
        return bad(&format!("it may contain only lowercase letters, digits and hyphens ({c:?} at position {pos})"));
    }
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad("it must begin with a letter");
    }
    if id.ends_with('-') {
        return bad("it must end with a letter or a digit");
    }
    if looks_like_uuid(id) {
        return bad("it must not be a UUID");
    }
    Ok(())
}

fn looks_like_uuid(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.len() == 5
        && groups.iter().zip([8, 4, 4, 4, 12]).all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// A system-generated id: a random UUIDv4, as the reference server generates.
pub(crate) fn generate_id() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// An `IPPrefix` must carry an address whose family matches its `af`, and a length the family
/// allows.
pub(crate) fn check_prefix(field: &str, p: &common::IpPrefix) -> Result<(), Status> {
    let bad = |why: String| Err(Status::invalid_argument(format!("{field}: {why}")));
    let Some(addr) = &p.addr else {
        return bad("the prefix has no address".into());
    };
    let max = match (common::IpAf::try_from(addr.af), &addr.v4_or_v6) {
        (Ok(common::IpAf::Inet), Some(V4OrV6::V4Addr(_))) => 32,
        (Ok(common::IpAf::Inet6), Some(V4OrV6::V6Addr(b))) if b.len() == 16 => 128,
        (Ok(common::IpAf::Inet6), Some(V4OrV6::V6Addr(b))) => {
            return bad(format!("an IPv6 address has 16 bytes, not {}", b.len()));
        }
        (_, None) => return bad("the address has neither v4_addr nor v6_addr".into()),
        _ => return bad(format!("address family {} does not match the address given", addr.af)),
    };
    if !(0..=max).contains(&p.len) {
        return bad(format!("prefix length {} is out of range 0..={max}", p.len));
    }
    Ok(())
}

/// "aa:bb:cc:dd:ee:ff" for error messages.
pub(crate) fn fmt_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub(crate) fn check_mac(field: &str, mac: &[u8]) -> Result<(), Status> {
    if mac.len() != 6 {
        return Err(Status::invalid_argument(format!("{field} must be exactly 6 bytes, got {}", mac.len())));
    }
    Ok(())
}

/// Page tokens are the hex-encoded name of the last object of the previous page, so paging stays
/// stable while objects come and go.
pub(crate) fn encode_token(last_name: &str) -> String {
    let mut s = String::with_capacity(2 + last_name.len() * 2);
    s.push_str("p1");
    for b in last_name.bytes() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub(crate) fn decode_token(token: &str) -> Result<String, Status> {
    let bad = || Status::invalid_argument(format!("invalid page_token {token:?}"));
    let hex = token.strip_prefix("p1").ok_or_else(bad)?;
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// `spec.vlanId` → `spec.vlan_id` (field masks may arrive in their JSON spelling).
pub(crate) fn snake_case(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        assert!(validate_user_id("id", "xpu-abc").is_ok());
        assert!(validate_user_id("id", "abc").is_err());
        assert!(validate_user_id("id", "Abcd").is_err());
        assert!(validate_user_id("id", "1abc").is_err());
        assert!(validate_user_id("id", "abcd-").is_err());
        assert!(validate_user_id("id", &"a".repeat(64)).is_err());
        assert!(validate_user_id("id", &"a".repeat(63)).is_ok());
        assert!(validate_user_id("id", "abcdef01-2345-4789-8abc-def012345678").is_err());
        let generated = generate_id();
        assert!(looks_like_uuid(&generated), "{generated}");
    }

    #[test]
    fn tokens_round_trip() {
        let name = "//network.opiproject.org/ports/xpu-a";
        assert_eq!(decode_token(&encode_token(name)).unwrap(), name);
        assert!(decode_token("zz").is_err());
        assert!(decode_token("p1z").is_err());
        assert!(decode_token("p1zz").is_err());
    }

    #[test]
    fn snake() {
        assert_eq!(snake_case("spec.vlanId"), "spec.vlan_id");
        assert_eq!(snake_case("spec.vlan_id"), "spec.vlan_id");
    }
}
