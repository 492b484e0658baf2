//! Smart-host pools (`[delivery.pools.NAME]`): which host takes the next
//! message. Each host is a destination of its own (its own connections,
//! reuse and backoff); the pool spreads messages over the hosts that are not
//! suspended by smooth weighted round robin (as nginx does), so over any run
//! of messages each host's share follows its weight, evenly interleaved.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use super::route::{SmartHost, Target, Via};
use crate::config::DeliveryConfig;

/// The pools of the config, parsed once.
#[derive(Debug, Default)]
pub struct Pools {
    pools: HashMap<String, Pool>,
}

#[derive(Debug)]
struct Pool {
    hosts: Vec<(SmartHost, i64)>,
    /// SHA-256 pins every host's certificate must match (none: the usual
    /// verification).
    pins: Vec<[u8; 32]>,
    /// Each host's running weight (the round robin's state).
    current: Mutex<Vec<i64>>,
}

impl Pools {
    /// The pools of `config` (checked at load, so every host parses).
    pub fn new(config: &DeliveryConfig) -> Pools {
        let pools = config
            .pools
            .iter()
            .map(|(name, p)| {
                let hosts: Vec<(SmartHost, i64)> = p
                    .hosts
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| {
                        SmartHost::parse(h)
                            .ok()
                            .map(|s| (s, i64::from(p.weight(i))))
                    })
                    .collect();
                let pins = p
                    .tls_fingerprint
                    .iter()
                    .filter_map(|f| super::tls::parse_fingerprint(f).ok())
                    .collect();
                let pool = Pool {
                    current: Mutex::new(vec![0; hosts.len()]),
                    hosts,
                    pins,
                };
                (name.clone(), pool)
            })
            .collect();
        Pools { pools }
    }

    /// The host of pool `name` the next message goes to, passing over
    /// `except` and the hosts whose destination is suspended
    /// (`suspended_until` says until when). With every host suspended and
    /// none to pass over, the one back soonest (its destination defers the
    /// message then); with `except` given and no other host up, none.
    pub fn pick(
        &self,
        name: &str,
        require_tls: bool,
        except: Option<&str>,
        suspended_until: impl Fn(&str) -> Option<Instant>,
    ) -> Option<Target> {
        let pool = self.pools.get(name)?;
        let target = |i: usize| Target {
            via: Via::PoolHost {
                pool: name.to_string(),
                host: pool.hosts[i].0.clone(),
            },
            require_tls,
            pins: pool.pins.clone(),
        };
        let now = Instant::now();
        let keys: Vec<String> = (0..pool.hosts.len()).map(|i| target(i).key()).collect();
        let back = |i: usize| suspended_until(&keys[i]).filter(|u| *u > now);
        let up: Vec<usize> = (0..keys.len())
            .filter(|&i| back(i).is_none() && Some(keys[i].as_str()) != except)
            .collect();
        if up.is_empty() {
            if except.is_some() {
                return None;
            }
            return (0..keys.len()).min_by_key(|&i| back(i)).map(target);
        }
        let mut current = pool.current.lock().unwrap_or_else(|e| e.into_inner());
        let total: i64 = up.iter().map(|&i| pool.hosts[i].1).sum();
        for &i in &up {
            current[i] += pool.hosts[i].1;
        }
        // The first of the highest, so equal weights go in config order.
        let best = *up
            .iter()
            .max_by_key(|&&i| (current[i], std::cmp::Reverse(i)))?;
        current[best] -= total;
        Some(target(best))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolConfig;
    use std::time::Duration;

    fn pools(weights: Option<Vec<u32>>) -> Pools {
        let mut config = DeliveryConfig::default();
        config.pools.insert(
            "out".into(),
            PoolConfig {
                hosts: vec![
                    "smtp://a:25".into(),
                    "smtp://b:25".into(),
                    "smtp://c:25".into(),
                ],
                weights,
                require_tls: None,
                tls_fingerprint: Vec::new(),
            },
        );
        Pools::new(&config)
    }

    fn host(t: &Target) -> String {
        match &t.via {
            Via::PoolHost { host, .. } => host.host.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn weights_are_followed_evenly_interleaved() {
        let p = pools(Some(vec![5, 1, 1]));
        let picks: String = (0..7)
            .map(|_| host(&p.pick("out", false, None, |_| None).unwrap()))
            .collect();
        // nginx's smooth round robin for 5:1:1.
        assert_eq!(picks, "aabacaa");
        let mut counts = HashMap::new();
        for _ in 0..7000 {
            *counts
                .entry(host(&p.pick("out", false, None, |_| None).unwrap()))
                .or_insert(0) += 1;
        }
        assert_eq!(counts["a"], 5000);
        assert_eq!(counts["b"], 1000);
        assert_eq!(counts["c"], 1000);
    }

    #[test]
    fn suspended_hosts_are_passed_over() {
        let p = pools(None);
        let later = Instant::now() + Duration::from_secs(60);
        let b_down = |k: &str| k.contains("//b:").then_some(later);
        let picks: String = (0..4)
            .map(|_| host(&p.pick("out", false, None, b_down).unwrap()))
            .collect();
        assert!(!picks.contains('b'), "{picks}");
        // The failed host is passed over; with it the only one up, none.
        let a = p.pick("out", false, None, |_| None).unwrap().key();
        let only_a_up = |k: &str| (!k.contains("//a:")).then_some(later);
        assert!(p.pick("out", false, Some(&a), only_a_up).is_none());
        // All down and nothing passed over: the one back soonest.
        let soon = Instant::now() + Duration::from_secs(5);
        let all_down = |k: &str| Some(if k.contains("//c:") { soon } else { later });
        assert_eq!(host(&p.pick("out", false, None, all_down).unwrap()), "c");
        assert!(p.pick("none", false, None, |_| None).is_none());
    }
}
