//! Connections: each destination's connections take its jobs one after
//! another until its FIFO is empty; opening one resolves the next hop, tries
//! its addresses and applies TLS and MTA-STS policy. A destination that
//! cannot be reached is suspended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::admin::metrics::{metrics, Direction, Result_};
use crate::authn::mta_sts::Mode;
use crate::delivery::client::{Client, Hop, Outgoing, TlsUse};
use crate::delivery::route::{Target, Via};
use crate::delivery::state::unix_now;
use crate::delivery::Error;
use crate::queue::QueuedMeta;

use super::{
    attempt_for, Attempt, Job, Outcome, Sched, Shared, StsUse, Unopened, IDLE_TIME, MAX_ADDRESSES,
};

impl Shared {
    /// One outbound connection: takes jobs from its destination until none is left.
    pub(super) async fn connection(self: Arc<Self>, key: String) {
        let mut client: Option<Client> = None;
        // Addresses of the destination used up by `client` (for MX fallback).
        let mut used = 0;
        loop {
            let next = {
                let mut s = self.lock();
                if s.stopping {
                    break;
                }
                let Some(d) = s.dests.get_mut(&key) else {
                    break;
                };
                let target = d.target.clone();
                match d.queue.pop_front() {
                    Some(job) => {
                        let info = s
                            .active
                            .get(&job.id)
                            .map(|a| (a.meta.clone(), a.body.clone(), a.cancel));
                        Ok((job, target, info))
                    }
                    // Registered under the same lock that found the queue empty,
                    // so a job queued right after finds this connection.
                    None if client.as_ref().is_some_and(Client::is_usable) => {
                        let (tx, rx) = oneshot::channel();
                        d.idle.push_back(tx);
                        Err(Some(rx))
                    }
                    None => Err(None),
                }
            };
            let (job, target, info) = match next {
                Ok(next) => next,
                Err(Some(wake)) => match tokio::time::timeout(IDLE_TIME, wake).await {
                    Ok(Ok(())) => continue,
                    _ => break,
                },
                Err(None) => break,
            };
            let Some((meta, body, cancel)) = info else {
                continue;
            };
            if cancel.is_some() {
                self.complete_job(&job.id, Vec::new(), &attempt_for(&key))
                    .await;
                continue;
            }
            let body = match body {
                Some(b) => b,
                None => match self.read_spooled(&job.id).await {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        let e = Error::from(e);
                        let results = job
                            .rcpts
                            .iter()
                            .map(|&i| (i, Outcome::from_error(&e, None)))
                            .collect();
                        self.complete_job(&job.id, results, &attempt_for(&key))
                            .await;
                        continue;
                    }
                },
            };
            let started = Instant::now();
            // A connection kept from an earlier job may have been closed by
            // the other side meanwhile; a new one is not.
            let mut kept = true;
            if !client.as_ref().is_some_and(Client::is_usable) {
                kept = false;
                match self.open(&target, 0).await {
                    Ok((c, n)) => {
                        client = Some(c);
                        used = n;
                    }
                    Err(e) => {
                        self.destination_failed(&key, &e, Some(job)).await;
                        break;
                    }
                }
            }
            // The operator may have suspended a recipient's domain since the
            // job was queued (a connection works through its destination's
            // queue one message after another): those recipients stay open
            // and untried, for after the resume.
            let job = self.without_suspended(job, &meta);
            if job.rcpts.is_empty() {
                self.complete_job(&job.id, Vec::new(), &attempt_for(&key))
                    .await;
                continue;
            }
            let outgoing = Outgoing {
                sender: job.sender.as_ref().unwrap_or(&meta.envelope.sender),
                params: &meta.envelope.params,
                recipients: job
                    .rcpts
                    .iter()
                    .map(|&i| &meta.envelope.recipients[i])
                    .collect(),
                message: &body,
            };
            let mut fell_back = false;
            let sent = loop {
                let Some(c) = client.as_mut() else {
                    unreachable!("a usable client was just ensured")
                };
                let remote = Some(format!("{} [{}]", c.host, c.peer.ip()));
                let dsn = c.supports_dsn();
                let sent = c.send(&outgoing).await;
                // RFC 5321 5.1: a temporary refusal of the transaction by one
                // MX host is a reason to try the next one now, not in an hour.
                let refused_4xx = matches!(
                    &sent,
                    Err(Error::Rejected { stage: "MAIL", reply }) if reply.code < 500
                );
                if refused_4xx && !fell_back && matches!(target.via, Via::Mx(_)) {
                    fell_back = true;
                    if let Ok((next, n)) = self.open(&target, used).await {
                        if let Some(old) = client.replace(next) {
                            old.quit().await;
                        }
                        used = n;
                        continue;
                    }
                }
                // A kept connection lost before the transaction began (the
                // other side closed it while idle, or went down): nothing
                // was sent, so a new connection tries again at once, and if
                // none opens the destination is down.
                if kept && matches!(&sent, Err(Error::Io { stage: "MAIL", .. })) {
                    kept = false;
                    client = None;
                    match self.open(&target, 0).await {
                        Ok((c, n)) => {
                            client = Some(c);
                            used = n;
                            continue;
                        }
                        Err(e) => break Err(e),
                    }
                }
                let results: Vec<(usize, Outcome)> = match sent {
                    Ok(per_rcpt) => job
                        .rcpts
                        .iter()
                        .zip(per_rcpt)
                        .map(|(&i, r)| {
                            let o = match r {
                                Ok(reply) => Outcome::delivered(reply, remote.clone(), dsn),
                                Err(e) => Outcome::from_error(&e, remote.clone()),
                            };
                            (i, o)
                        })
                        .collect(),
                    Err(e) => job
                        .rcpts
                        .iter()
                        .map(|&i| (i, Outcome::from_error(&e, remote.clone())))
                        .collect(),
                };
                break Ok((results, c.host.clone(), c.peer, c.tls, c.mta_sts.clone()));
            };
            let (results, host, addr, tls, mta_sts) = match sent {
                Ok(sent) => sent,
                Err(e) => {
                    self.destination_failed(&key, &e, Some(job)).await;
                    break;
                }
            };
            let attempt = Attempt {
                route: &key,
                host: Some(&host),
                addr: Some(addr),
                tls,
                mta_sts: mta_sts.as_deref(),
                started,
            };
            self.complete_job(&job.id, results, &attempt).await;
            let mut s = self.lock();
            if let Some(d) = s.dests.get_mut(&key) {
                d.backoff = Duration::ZERO;
            }
        }
        if let Some(c) = client {
            c.quit().await;
        }
        let mut s = self.lock();
        s.connections -= 1;
        let remove = match s.dests.get_mut(&key) {
            Some(d) => {
                d.connections -= 1;
                if d.connections == 0 {
                    d.idle.clear();
                }
                d.connections == 0 && d.queue.is_empty() && d.backoff_until.is_none()
            }
            None => false,
        };
        if remove {
            s.dests.remove(&key);
        } else {
            self.kick(&mut s, &key);
        }
        while s.connections < self.config.delivery.max_connections {
            let Some(k) = s.starved.pop_front() else {
                break;
            };
            self.kick(&mut s, &k);
        }
    }

    /// `job` less its recipients whose domain is suspended now.
    fn without_suspended(&self, mut job: Job, meta: &QueuedMeta) -> Job {
        let suspended = self.suspended();
        if suspended.is_empty() {
            return job;
        }
        let now = unix_now();
        let before = job.rcpts.len();
        job.rcpts.retain(|&i| {
            let domain = meta.envelope.recipients[i].address.domain();
            suspended.blocks(domain, now).is_none()
        });
        if job.rcpts.len() < before {
            tracing::info!(queue_id = %job.id, held_back = before - job.rcpts.len(),
                "recipients held back: their domain was suspended");
        }
        job
    }

    /// The destination could not be reached: suspend it for a while (doubling,
    /// from the first retry interval up to the last), and defer or fail its
    /// queued jobs (and `failed`, the one that found it down) with the same
    /// reason. A pool host's jobs go to the pool's next host at once instead,
    /// when one is up.
    async fn destination_failed(self: &Arc<Self>, key: &str, why: &Unopened, failed: Option<Job>) {
        let e = &why.error;
        let jobs: Vec<Job> = {
            let mut s = self.lock();
            let retry = &self.config.delivery.retry;
            let Some(d) = s.dests.get_mut(key) else {
                return;
            };
            if e.is_transient() {
                let first = retry
                    .first()
                    .map(|r| r.0)
                    .unwrap_or(Duration::from_secs(60));
                let last = retry.last().map(|r| r.0).unwrap_or(first);
                d.backoff = if d.backoff.is_zero() {
                    first
                } else {
                    (d.backoff * 2).min(last)
                };
                d.backoff_until = Some(Instant::now() + d.backoff);
                d.last_error = Some(e.reply());
                tracing::info!(destination = key, backoff = ?d.backoff, reason = %e, "destination suspended");
            }
            let pool = match &d.target.via {
                Via::PoolHost { pool, .. } if e.is_transient() => {
                    Some((pool.clone(), d.target.require_tls))
                }
                _ => None,
            };
            let jobs: Vec<Job> = failed.into_iter().chain(d.queue.drain(..)).collect();
            match pool {
                Some((pool, require_tls)) => {
                    self.to_next_pool_host(&mut s, &pool, require_tls, key, jobs)
                }
                None => jobs,
            }
        };
        for job in jobs {
            let results = job
                .rcpts
                .iter()
                .map(|&i| (i, Outcome::from_error(e, None)))
                .collect();
            let attempt = Attempt {
                mta_sts: why.mta_sts.as_deref(),
                ..attempt_for(key)
            };
            self.complete_job(&job.id, results, &attempt).await;
        }
        self.timer.notify_one();
    }

    /// Moves jobs from pool host `failed` to the pool's next host that is up;
    /// returns those that found none.
    fn to_next_pool_host(
        self: &Arc<Self>,
        s: &mut Sched,
        pool: &str,
        require_tls: bool,
        failed: &str,
        jobs: Vec<Job>,
    ) -> Vec<Job> {
        let mut stranded = Vec::new();
        for job in jobs {
            let suspended = |k: &str| s.dests.get(k).and_then(|d| d.backoff_until);
            match self.pools.pick(pool, require_tls, Some(failed), suspended) {
                Some(target) => {
                    tracing::info!(queue_id = %job.id, from = failed, to = %target.key(), "pool host down; sent to the next");
                    self.enqueue(s, target, job);
                }
                None => stranded.push(job),
            }
        }
        stranded
    }

    /// Opens a connection to a destination: MX hosts in order (or the smart
    /// host), each of their addresses, until one gets as far as MAIL.
    /// `skip` addresses are passed over (those tried by an earlier connection);
    /// returns the client and how many addresses are used up with it.
    async fn open(&self, target: &Target, skip: usize) -> Result<(Client, usize), Unopened> {
        let d = &self.config.delivery;
        let mut mta_sts = None;
        let (hosts, port, tls_use, credentials) = match &target.via {
            Via::Mx(domain) => {
                let mut hosts: Vec<String> = self
                    .dns
                    .mx_hosts(domain)
                    .await?
                    .into_iter()
                    .map(|h| h.name)
                    .collect();
                let mut tls = if target.require_tls {
                    TlsUse::Required
                } else {
                    TlsUse::Opportunistic
                };
                if let Some(sts) = self.mta_sts(domain, &hosts).await {
                    if sts.enforce {
                        // Only the hosts the policy lists, over verified TLS:
                        // never another host, never clear text.
                        hosts.retain(|h| sts.policy.allows(h));
                        if hosts.is_empty() {
                            return Err(Unopened {
                                error: Error::MtaSts(format!(
                                    "no MX host of {domain} is in its policy ({})",
                                    sts.outcome
                                )),
                                mta_sts: Some(sts.refused("no MX host in the policy")),
                            });
                        }
                        tls = TlsUse::Required;
                    }
                    mta_sts = Some(sts);
                }
                (hosts, d.mx_port, tls, None)
            }
            Via::Smarthost(sh) | Via::PoolHost { host: sh, .. } => {
                let tls = if sh.implicit_tls {
                    TlsUse::Implicit
                } else if target.require_tls {
                    TlsUse::Required
                } else if sh.credentials.is_some() {
                    TlsUse::OfferedVerified
                } else {
                    TlsUse::Opportunistic
                };
                (vec![sh.host.clone()], sh.port, tls, sh.credentials.as_ref())
            }
        };
        // A pinned next hop gets TLS or nothing: never the clear-text retry.
        let (tls_use, pinned) = if target.pins.is_empty() {
            (tls_use, None)
        } else {
            let implicit = matches!(&target.via, Via::Smarthost(sh) if sh.implicit_tls);
            let config = self.tls.pinned(&target.pins).map_err(Error::Setup)?;
            let tls_use = if implicit {
                TlsUse::Implicit
            } else {
                TlsUse::Required
            };
            (tls_use, Some(config))
        };
        let mut last_error: Option<Error> = None;
        // Hosts an enforced policy allowed that had no valid TLS for it.
        let mut without_tls: Vec<&str> = Vec::new();
        let mut tried = 0;
        let mut looped = false;
        for host in &hosts {
            let addrs = match self.dns.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    last_error = Some(e);
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, port);
                if self.is_own(addr) {
                    looped = true;
                    continue;
                }
                if tried == MAX_ADDRESSES {
                    break;
                }
                tried += 1;
                if tried <= skip {
                    continue;
                }
                let hop = Hop {
                    host,
                    addr,
                    tls: tls_use,
                    credentials,
                    pinned: pinned.clone(),
                };
                let mut connected =
                    Client::connect(&hop, &self.config.hostname, &self.tls, self.timeouts).await;
                // Like Postfix's "may" level: when opportunistic TLS fails in the
                // handshake, the same host is tried again in clear text, which is
                // what it would have got from a server without STARTTLS.
                if tls_use == TlsUse::Opportunistic && matches!(connected, Err(Error::Tls(_))) {
                    let plain = Hop {
                        tls: TlsUse::Plain,
                        ..hop.clone()
                    };
                    connected =
                        Client::connect(&plain, &self.config.hostname, &self.tls, self.timeouts)
                            .await;
                }
                match connected {
                    Ok(mut c) => {
                        c.mta_sts = mta_sts.as_ref().map(|sts| sts.connected(host));
                        metrics().outbound.inc(Result_::Ok);
                        if let Some(v) = c.tls {
                            metrics().tls_session(Direction::Outbound, v);
                        }
                        return Ok((c, tried));
                    }
                    Err(e) => {
                        metrics().outbound.inc(Result_::Failed);
                        tracing::debug!(host = %host, %addr, error = %e, "next hop failed; trying the next");
                        let enforced = mta_sts.as_ref().is_some_and(|sts| sts.enforce);
                        if enforced
                            && matches!(e, Error::Tls(_))
                            && !without_tls.contains(&host.as_str())
                        {
                            without_tls.push(host);
                        }
                        last_error = Some(e);
                    }
                }
            }
        }
        let error = match last_error {
            Some(e) => e,
            None if looped => Error::Loop(target.key()),
            None => Error::Dns {
                name: target.key(),
                message: "no address to connect to".into(),
                transient: true,
            },
        };
        let mta_sts = mta_sts.map(|sts| {
            if without_tls.is_empty() {
                sts.outcome
            } else {
                sts.refused(&format!("no valid TLS at {}", without_tls.join(" ")))
            }
        });
        Err(Unopened { error, mta_sts })
    }

    /// The MTA-STS policy of an MX destination, and the words for the log:
    /// its mode and where it came from, and in testing mode the hosts
    /// enforce would refuse.
    async fn mta_sts(&self, domain: &str, hosts: &[String]) -> Option<StsUse> {
        let sts = self.mta_sts.as_ref()?;
        if domain.starts_with('[') {
            return None;
        }
        let found = sts.policy(domain).await?;
        let mode = found.policy.mode;
        let outcome = format!("{} ({})", mode.as_str(), found.source);
        match mode {
            Mode::Enforce => Some(StsUse {
                enforce: true,
                policy: found.policy,
                outcome,
            }),
            Mode::Testing => {
                let refused: Vec<&str> = hosts
                    .iter()
                    .filter(|h| !found.policy.allows(h))
                    .map(String::as_str)
                    .collect();
                let outcome = if refused.is_empty() {
                    outcome
                } else {
                    let refused = refused.join(" ");
                    tracing::info!(domain, refused = %refused, "MTA-STS testing: MX hosts not in the policy, delivering anyway");
                    format!("{outcome}; not in policy: {refused}")
                };
                Some(StsUse {
                    enforce: false,
                    policy: found.policy,
                    outcome,
                })
            }
            Mode::None => None,
        }
    }

    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip() == addr.ip()
                    || (own.ip().is_unspecified()
                        && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }
}
