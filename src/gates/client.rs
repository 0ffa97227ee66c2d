//! The client address a request is counted against (the failed-key budget, throttle summaries, the
//! audit's `client_addr`): the socket peer, unless the peer is one of the configured `trusted_proxies`;
//! then the address that proxy forwarded in `X-Forwarded-For`. Anyone can write that header, so it is
//! believed only as far as trusted hops vouch for it: read from the right (each proxy appends the
//! address it saw), the first entry that is not itself a trusted proxy is the client.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The address the gateway attributes a request to.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // An entry a trusted proxy wrote but nobody can read: the last trusted hop is all we know.
        let Some(ip) = parse_hop(hop) else {
            return client;
        };
        client = ip;
        if !is_trusted(&ip) {
            return ip;
        }
    }
    client
}

/// `192.0.2.1`, `2001:db8::1`, and the `ip:port` / `[v6]:port` forms some proxies write.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["203.0.113.9"]);
        assert_eq!(
            client_address(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(
            client_address(ip("10.1.1.1"), &h, &[]),
            ip("10.1.1.1"),
            "nothing trusted by default"
        );
    }

    #[test]
    fn behind_trusted_proxies_the_rightmost_untrusted_hop_is_the_client() {
        let trusted = [
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.7/32".parse().unwrap(),
        ];
        // The client forged a first entry; the proxies appended what they saw.
        let h = headers(&["1.2.3.4, 203.0.113.9", "192.0.2.7"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &h, &trusted),
            ip("203.0.113.9")
        );
        let ported = headers(&["[2001:db8::5]:4711"]);
        assert_eq!(
            client_address(ip("10.0.0.2"), &ported, &trusted),
            ip("2001:db8::5")
        );
    }

    #[test]
    fn a_trusted_peer_without_a_readable_header_is_the_client() {
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        assert_eq!(
            client_address(ip("10.0.0.2"), &headers(&[]), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), &headers(&["unknown"]), &trusted),
            ip("10.0.0.2")
        );
        assert_eq!(
            client_address(ip("10.0.0.2"), &headers(&["10.0.0.9"]), &trusted),
            ip("10.0.0.9"),
            "every hop trusted: the farthest one"
        );
    }
}
