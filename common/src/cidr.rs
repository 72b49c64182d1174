//! Network blocks as Postfix writes them in `mynetworks` and `cidr:`
//! tables: `192.168.1.0/24`, `[2001:db8::]/32`, a bare address
//! (`10.0.0.1`, `[::1]`, `::1`) for a single host. Lists of them
//! (`!` exclusions, files, tables) are [`crate::match_list`]'s.
//!
//! An IPv4 address that reaches us as an IPv4-mapped IPv6 address
//! (`::ffff:127.0.0.1`, from a dual-stack listener) is matched as the IPv4
//! address it is ([`normalize`]).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network block: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// An IPv4-mapped IPv6 address as its IPv4 address; others unchanged.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

/// The top `prefix` bits of a `width`-bit address.
fn mask(prefix: u8, width: u8) -> u128 {
    if prefix == 0 {
        return 0;
    }
    let full: u128 = if width == 32 {
        u32::MAX as u128
    } else {
        u128::MAX
    };
    let shift = u32::from(width - prefix);
    (full >> shift) << shift
}

impl Cidr {
    /// Parses `addr`, `addr/len`, `[addr]` or `[addr]/len`. Host bits under
    /// the mask must be zero, as Postfix requires ("non-null host address
    /// bits in 10.0.0.1/8, perhaps you should use 10.0.0.0/8 instead").
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let t = text.trim();
        let (addr_part, len_part) = match t.rsplit_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (t, None),
        };
        let addr_part = match addr_part.strip_prefix('[') {
            Some(inner) => inner
                .strip_suffix(']')
                .ok_or_else(|| format!("missing ']' in \"{text}\""))?,
            None => addr_part,
        };
        let ip: IpAddr = addr_part
            .parse()
            .map_err(|_| format!("bad address in \"{text}\""))?;
        let ip = normalize(ip);
        let (value, width) = bits(ip);
        let prefix = match len_part {
            None => width,
            Some(l) => {
                let p: u8 = l
                    .parse()
                    .map_err(|_| format!("bad mask length in \"{text}\""))?;
                // A v4-mapped v6 block written with a v6 length.
                let p = if width == 32 && addr_part.contains(':') {
                    p.checked_sub(96)
                        .ok_or_else(|| format!("bad mask length in \"{text}\""))?
                } else {
                    p
                };
                if p > width {
                    return Err(format!("bad mask length in \"{text}\""));
                }
                p
            }
        };
        let m = mask(prefix, width);
        if value & !m != 0 {
            let net = Cidr::from_bits(value & m, width, prefix);
            return Err(format!(
                "non-null host address bits in \"{text}\", perhaps you should use \"{net}\" instead"
            ));
        }
        Ok(Cidr { net: ip, prefix })
    }

    fn from_bits(value: u128, width: u8, prefix: u8) -> Cidr {
        let net = if width == 32 {
            IpAddr::V4((value as u32).into())
        } else {
            IpAddr::V6(value.into())
        };
        Cidr { net, prefix }
    }

    /// Whether `ip` is inside this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (value, width) = bits(normalize(ip));
        let (net, net_width) = bits(self.net);
        width == net_width && (value & mask(self.prefix, width)) == net
    }

    pub fn network(&self) -> IpAddr {
        self.net
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s)
    }
}

impl fmt::Display for Cidr {
    /// Postfix's form: IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpAddr::V4(a) => write!(f, "{a}/{}", self.prefix),
            IpAddr::V6(a) => write!(f, "[{a}]/{}", self.prefix),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks() {
        let c = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(c.contains(ip("127.1.2.3")));
        assert!(!c.contains(ip("128.0.0.1")));
        assert!(c.contains(ip("::ffff:127.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let h = Cidr::parse("192.168.1.7").unwrap();
        assert!(h.contains(ip("192.168.1.7")));
        assert!(!h.contains(ip("192.168.1.8")));
        let v6 = Cidr::parse("[2001:db8::]/32").unwrap();
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::")));
        assert!(Cidr::parse("[::1]/128").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(Cidr::parse("[::1]").unwrap().contains(ip("::1")));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!(!all.contains(ip("::2")));
        assert!(Cidr::parse("[::]/0").unwrap().contains(ip("2001::1")));
        assert!(Cidr::parse("10.0.0.0/31").unwrap().contains(ip("10.0.0.1")));
        assert!(!Cidr::parse("10.0.0.0/31").unwrap().contains(ip("10.0.0.2")));
        assert_eq!(Cidr::parse("[::1]/128").unwrap().to_string(), "[::1]/128");
        // IPv4-mapped block with a v6 length.
        assert!(Cidr::parse("[::ffff:10.0.0.0]/104")
            .unwrap()
            .contains(ip("10.9.9.9")));
    }

    #[test]
    fn errors() {
        let e = Cidr::parse("10.0.0.1/8").unwrap_err();
        assert!(e.contains("perhaps you should use \"10.0.0.0/8\""), "{e}");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("[::1/128").is_err());
        assert!(Cidr::parse("example.com").is_err());
        assert!(Cidr::parse("10.0.0.0/x").is_err());
    }
}
