//! One SMTP dialogue, generic over its stream so it runs over TCP, TLS or an
//! in-memory duplex alike. Each verb adds its own `impl Session<S>` block in a
//! file of its own; this file holds the loop, the buffers and the transaction.

mod auth;
mod authn;
mod data;
mod ehlo;
mod mail;
mod rcpt;

pub(crate) use data::{check_added_recipients, received_header};

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::admin::metrics::{metrics, ConnOutcome, Stage};
use crate::envelope::{Envelope, SessionInfo};
use crate::metadata::SharedMetadata;
use crate::plugins::{Lease, Scopes};
use crate::policy::Verdict;
use crate::server::{Context, Listener};
use crate::smtp::codec::{self, BdatReceiver, CommandLine};
use crate::smtp::command;
use crate::smtp::reply::Reply;

/// How the dialogue goes on after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Flow {
    /// Read the next command.
    Continue,
    /// Close the connection (replies already flushed).
    Close,
    /// The client asked for STARTTLS and got 220: hand the stream to TLS.
    StartTls,
}

/// Why a read ended without data.
#[derive(Debug)]
enum ReadEnd {
    /// The client closed the connection.
    Eof,
    /// Nothing arrived in time (421 sent).
    Timeout,
    /// The relay is shutting down (421 sent).
    Shutdown,
    /// A socket error.
    Io(#[allow(dead_code)] std::io::Error),
}

/// One SMTP session.
pub struct Session<S> {
    stream: S,
    /// Bytes read but not yet consumed.
    input: BytesMut,
    /// Replies not yet written; flushed before the session waits for input,
    /// which batches the replies to a pipelined group (RFC 2920).
    output: Vec<u8>,
    ctx: Arc<Context>,
    listener: Arc<Listener>,
    /// The chain this session started with (a reload does not change it),
    /// and the plugin instances lent to the transaction in progress.
    hooks: Lease,
    info: SessionInfo,
    /// The plugins' metadata of the session, and of the transaction once
    /// MAIL FROM begins one.
    metadata: Scopes,
    /// EHLO (rather than HELO) was used.
    esmtp: bool,
    /// The transaction in progress, from MAIL to the end of data.
    tx: Option<Envelope>,
    /// The transaction's authentication results: SPF from MAIL FROM on,
    /// the rest once the message has ended.
    authn: crate::authn::Results,
    /// SPF of the HELO name, checked once per name.
    helo_spf: Option<(String, Option<crate::authn::results::Spf>)>,
    /// Set while a BDAT transaction collects its chunks.
    bdat: Option<BdatReceiver>,
    /// The memory reserved for the BDAT message being collected.
    bdat_memory: Option<data::MemoryReservation>,
    errors: usize,
    /// Still discarding the rest of an over-long command line.
    skipping_long_line: bool,
    /// When the command line being read must be complete: `command_timeout`
    /// covers a whole line, so a client trickling a byte at a time cannot
    /// hold its connection open for ever.
    line_deadline: Option<tokio::time::Instant>,
    /// The command being answered, for the reply counters.
    stage: Stage,
    /// The last reply to DATA or BDAT, for the transaction's log record.
    data_reply: Option<Reply>,
}

/// Everything a session carries across STARTTLS (the stream is replaced).
pub struct Carry {
    ctx: Arc<Context>,
    listener: Arc<Listener>,
    hooks: Lease,
    info: SessionInfo,
    /// The session's metadata lasts as long as the connection.
    session_metadata: Option<SharedMetadata>,
    errors: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A session on a fresh connection.
    pub fn new(
        stream: S,
        ctx: Arc<Context>,
        listener: Arc<Listener>,
        info: SessionInfo,
    ) -> Session<S> {
        let hooks = ctx.chain.current().lease();
        let session_metadata = Some(SharedMetadata::new(ctx.config.plugins.max_metadata_size));
        Session::resume(
            stream,
            Carry {
                ctx,
                listener,
                hooks,
                info,
                session_metadata,
                errors: 0,
            },
        )
    }

    /// A session continuing on a new stream (after the TLS handshake). RFC 3207:
    /// the client starts over with EHLO, nothing from before TLS is kept.
    pub fn resume(stream: S, carry: Carry) -> Session<S> {
        let mut info = carry.info;
        info.helo = None;
        Session {
            stream,
            input: BytesMut::with_capacity(8192),
            output: Vec::with_capacity(1024),
            ctx: carry.ctx,
            listener: carry.listener,
            hooks: carry.hooks,
            info,
            metadata: Scopes {
                session: carry.session_metadata,
                transaction: None,
            },
            esmtp: false,
            tx: None,
            authn: crate::authn::Results::default(),
            helo_spf: None,
            bdat: None,
            bdat_memory: None,
            errors: carry.errors,
            skipping_long_line: false,
            line_deadline: None,
            stage: Stage::Connect,
            data_reply: None,
        }
    }

    /// Takes the stream and the state that survives STARTTLS.
    pub fn into_parts(mut self) -> (S, Carry) {
        self.hooks.end();
        let carry = Carry {
            ctx: self.ctx,
            listener: self.listener,
            hooks: self.hooks,
            info: self.info,
            session_metadata: self.metadata.session,
            errors: self.errors,
        };
        (self.stream, carry)
    }

    /// The stream the session runs on.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// The facts about this session.
    pub fn info_mut(&mut self) -> &mut SessionInfo {
        &mut self.info
    }

    /// Runs the connect hook and sends the banner. Returns false when the
    /// connection is to be closed.
    pub async fn greet(&mut self) -> bool {
        let verdict = self.hooks.connect(&self.info, &self.metadata).await;
        let counters = metrics().listener(self.listener.config.address);
        match verdict {
            Verdict::Continue | Verdict::Accept => {
                counters.connections.inc(ConnOutcome::Accepted);
                let banner = format!("{} ESMTP Postern", self.ctx.config.hostname);
                self.reply(Reply::new(220, "", banner));
                self.flush().await.is_ok()
            }
            Verdict::Reject(r) | Verdict::Tempfail(r) | Verdict::Disconnect(r) => {
                tracing::info!(peer = %self.info.peer, reply = %r, "connection refused by policy");
                counters.connections.inc(ConnOutcome::Policy);
                metrics().reply(Stage::Connect, r.code);
                self.reply(r);
                let _ = self.flush().await;
                false
            }
        }
    }

    /// Runs the dialogue until the client quits, the connection drops, or it
    /// asks for TLS.
    pub async fn run(&mut self) -> Flow {
        loop {
            if self.skipping_long_line {
                match self.input.iter().position(|&b| b == b'\n') {
                    Some(i) => {
                        self.input.advance(i + 1);
                        self.skipping_long_line = false;
                        self.line_deadline = None;
                        if self.error_reply(Reply::LINE_TOO_LONG) == Flow::Close {
                            return self.close().await;
                        }
                    }
                    None => {
                        self.input.clear();
                        if self.read_more().await.is_err() {
                            return Flow::Close;
                        }
                    }
                }
                continue;
            }
            match codec::next_command_line(&self.input) {
                CommandLine::Line(n) => {
                    let line = self.input.split_to(n);
                    self.line_deadline = None;
                    match self.command(&line).await {
                        Flow::Continue => {}
                        Flow::Close => return self.close().await,
                        Flow::StartTls => {
                            return if self.flush().await.is_ok() {
                                Flow::StartTls
                            } else {
                                Flow::Close
                            };
                        }
                    }
                }
                CommandLine::TooLong(n) => {
                    let ended = self.input[n - 1] == b'\n';
                    self.input.advance(n);
                    if ended {
                        self.line_deadline = None;
                        if self.error_reply(Reply::LINE_TOO_LONG) == Flow::Close {
                            return self.close().await;
                        }
                    } else {
                        self.skipping_long_line = true;
                    }
                }
                CommandLine::Incomplete => {
                    if self.read_more().await.is_err() {
                        return Flow::Close;
                    }
                }
            }
        }
    }

    async fn close(&mut self) -> Flow {
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        Flow::Close
    }

    /// Parses and dispatches one command line.
    async fn command(&mut self, line: &[u8]) -> Flow {
        let request = match command::parse(line) {
            Ok(r) => r,
            Err(reply) => {
                self.stage = Stage::Other;
                return self.error_reply(reply);
            }
        };
        self.stage = match &request {
            Request::Ehlo { .. } | Request::Helo { .. } => Stage::Helo,
            Request::Mail { .. } => Stage::Mail,
            Request::Rcpt { .. } => Stage::Rcpt,
            Request::Data | Request::Bdat { .. } => Stage::Data,
            Request::Auth { .. } => Stage::Auth,
            Request::StartTls => Stage::StartTls,
            _ => Stage::Other,
        };
        match request {
            Request::Ehlo { host } => self.ehlo(host, true).await,
            Request::Helo { host } => self.ehlo(host, false).await,
            Request::Mail { from } => self.mail(from).await,
            Request::Rcpt { to } => self.rcpt(to, line).await,
            Request::Data => self.data().await,
            Request::Bdat { chunk_size, is_last } => self.bdat(chunk_size, is_last).await,
            Request::Auth { mechanism, initial_response } => self.auth(mechanism, initial_response).await,
            Request::StartTls => self.starttls(),
            Request::Rset => {
                self.reset_transaction();
                self.reply(Reply::OK)
            }
            Request::Noop { .. } => self.reply(Reply::OK),
            Request::Quit => {
                self.reply(Reply::BYE);
                Flow::Close
            }
            Request::Vrfy { .. } => self.reply(Reply::CANNOT_VRFY),
            Request::Help { .. } => self.reply(Reply::lines(
                214,
                "2.0.0",
                vec![
                    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH".into(),
                    "End of HELP".into(),
                ],
            )),
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. }
            | Request::Lhlo { .. } => self.error_reply(Reply::NOT_IMPLEMENTED),
        }
    }

    fn starttls(&mut self) -> Flow {
        if self.info.tls.is_some() {
            return self.error_reply(Reply::BAD_SEQUENCE.with_text("TLS already active"));
        }
        if !self.listener.offers_starttls() {
            return self.error_reply(Reply::TLS_UNAVAILABLE);
        }
        // CVE-2011-0411: anything pipelined after STARTTLS was sent in clear text
        // and must not be read as if it came over TLS.
        self.input.clear();
        self.reply(Reply::READY_FOR_TLS);
        Flow::StartTls
    }

    /// Clears the transaction (RSET, EHLO, after the end of data).
    fn reset_transaction(&mut self) {
        self.hooks.end();
        self.tx = None;
        self.authn = crate::authn::Results::default();
        self.metadata.transaction = None;
        self.bdat = None;
        self.bdat_memory = None;
    }

    /// Queues a reply. Replies of 400 and up count as errors.
    fn reply(&mut self, reply: Reply) -> Flow {
        if reply.code >= 400 {
            return self.error_reply(reply);
        }
        self.note(&reply);
        reply.write_to(&mut self.output);
        Flow::Continue
    }

    /// Counts a reply, and keeps it when it ends a message.
    fn note(&mut self, reply: &Reply) {
        metrics().reply(self.stage, reply.code);
        if self.stage == Stage::Data {
            self.data_reply = Some(reply.clone());
        }
    }

    /// Queues a negative reply and counts it; too many errors end the session.
    fn error_reply(&mut self, reply: Reply) -> Flow {
        self.note(&reply);
        reply.write_to(&mut self.output);
        self.errors += 1;
        if self.errors >= self.ctx.config.limits.max_errors {
            tracing::info!(peer = %self.info.peer, errors = self.errors, "too many errors, closing");
            Reply::TOO_MANY_ERRORS.write_to(&mut self.output);
            return Flow::Close;
        }
        Flow::Continue
    }

    /// Applies a hook's verdict: `Some(flow)` when it refused, `None` to go on.
    fn refused(&mut self, verdict: Verdict) -> Option<Flow> {
        match verdict {
            Verdict::Continue | Verdict::Accept => None,
            Verdict::Reject(r) | Verdict::Tempfail(r) => Some(self.error_reply(r)),
            Verdict::Disconnect(r) => {
                self.note(&r);
                r.write_to(&mut self.output);
                Some(Flow::Close)
            }
        }
    }

    /// Sends the replies queued so far; then, with the client served, the
    /// shadow calls of the hooks behind them.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await?;
            self.output.clear();
        }
        self.hooks.run_shadows().await;
        Ok(())
    }

    /// Flushes pending replies, then waits for more of the command line,
    /// at most until the line's deadline.
    async fn read_more(&mut self) -> Result<usize, ReadEnd> {
        let idle = self.tx.is_none() && self.bdat.is_none();
        let now = tokio::time::Instant::now();
        let timeout = self.ctx.config.limits.command_timeout.0;
        let deadline = *self.line_deadline.get_or_insert(now + timeout);
        self.read_more_within(deadline.saturating_duration_since(now), idle)
            .await
    }

    /// Reads with a deadline; while `interruptible`, a shutdown ends the session
    /// (a transaction in progress is allowed to finish).
    async fn read_more_within(
        &mut self,
        timeout: Duration,
        interruptible: bool,
    ) -> Result<usize, ReadEnd> {
        if let Err(e) = self.flush().await {
            return Err(ReadEnd::Io(e));
        }
        if self.input.capacity() - self.input.len() < 4096 {
            self.input.reserve(8192);
        }
        let mut shutdown = self.ctx.shutdown.clone();
        let result = tokio::select! {
            r = tokio::time::timeout(timeout, self.stream.read_buf(&mut self.input)) => Some(r),
            _ = shutdown.wait_for(|stop| *stop), if interruptible => None,
        };
        let Some(result) = result else {
            Reply::SHUTTING_DOWN.write_to(&mut self.output);
            let _ = self.close().await;
            return Err(ReadEnd::Shutdown);
        };
        match result {
            Ok(Ok(0)) => Err(ReadEnd::Eof),
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(ReadEnd::Io(e)),
            Err(_) => {
                tracing::info!(peer = %self.info.peer, "timeout, closing");
                Reply::TIMEOUT.write_to(&mut self.output);
                let _ = self.close().await;
                Err(ReadEnd::Timeout)
            }
        }
    }

    /// Reads one line (for AUTH continuations), without its line end.
    async fn read_line(&mut self) -> Option<Vec<u8>> {
        loop {
            match codec::next_command_line(&self.input) {
                CommandLine::Line(n) => {
                    let line = self.input.split_to(n);
                    self.line_deadline = None;
                    let line = line.strip_suffix(b"\n").unwrap_or(&line);
                    return Some(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
                }
                CommandLine::TooLong(_) => return None,
                CommandLine::Incomplete => self.read_more().await.ok()?,
            };
        }
    }
}

#[cfg(test)]
mod tests;
