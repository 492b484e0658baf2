//! `postern queue`: shows and steers the spool of a running relay (through
//! its control socket) or of a stopped one (on the files, with the lock).

use std::path::Path;

use clap::{Args, Subcommand};

use postern::config::{Config, HumanDuration};
use postern::delivery::control::{self, Action, Answer, Entry, Request, Selector, Summary};

/// Which messages: every option given must match.
#[derive(Debug, Args, Default)]
pub struct SelectorArgs {
    /// A recipient still to be delivered is in this domain.
    #[arg(long)]
    domain: Option<String>,
    /// The envelope sender: an address, `<>` (the null sender) or `@domain`.
    #[arg(long)]
    sender: Option<String>,
    /// Arrived at least this long ago (`30m`, `2d`).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<HumanDuration>,
    /// queued, deferred, held or quarantine.
    #[arg(long)]
    state: Option<String>,
}

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    s.parse()
}

impl SelectorArgs {
    fn selector(self, id: Option<String>, all: bool) -> Selector {
        Selector {
            id,
            domain: self.domain,
            sender: self.sender,
            older_than: self.older_than.map(|d| d.0.as_secs()),
            state: self.state,
            all,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Messages: id, age, size, sender, recipients with state, attempts,
    /// next attempt, last reply.
    List {
        #[command(flatten)]
        select: SelectorArgs,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// One message.
    Show {
        /// Queue id.
        id: String,
        /// Print a JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Retry now: one message, the selected ones, or every one.
    Flush {
        /// Queue id.
        id: Option<String>,
        #[command(flatten)]
        select: SelectorArgs,
    },
    /// Remove messages without a bounce.
    Delete {
        /// Queue id.
        id: Option<String>,
        #[command(flatten)]
        select: SelectorArgs,
        /// Every message, when no id or selector is given.
        #[arg(long)]
        all: bool,
    },
    /// Keep messages from delivery until released.
    Hold {
        /// Queue id.
        id: Option<String>,
        #[command(flatten)]
        select: SelectorArgs,
        /// Every message, when no id or selector is given.
        #[arg(long)]
        all: bool,
    },
    /// Release held or quarantined messages and try them now (a released
    /// quarantined message's age for max_age starts again).
    Release {
        /// Queue id.
        id: Option<String>,
        #[command(flatten)]
        select: SelectorArgs,
        /// Every message, when no id or selector is given.
        #[arg(long)]
        all: bool,
    },
    /// Destinations by message count and age (like Postfix's qshape).
    Summary {
        #[command(flatten)]
        select: SelectorArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop delivery to a recipient domain, for mail queued now and later.
    Suspend {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// For this long (`30m`, `2h`); until `resume` when absent.
        #[arg(long = "for", value_parser = parse_duration)]
        for_: Option<HumanDuration>,
    },
    /// Lift a suspension and try the domain's mail now.
    Resume {
        /// The domain.
        #[arg(long)]
        domain: String,
    },
    /// The suspended domains.
    Suspended {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `postern queue` command.
pub fn run(path: &Path, command: QueueCommand) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let spool = config.resolve(&config.spool.path);
    let act = |action, id, select: SelectorArgs, all| Request::Act {
        action,
        selector: select.selector(id, all),
    };
    let (req, json) = match command {
        QueueCommand::List { select, json } => (Request::List(select.selector(None, false)), json),
        QueueCommand::Show { id, json } => (Request::Show { id }, json),
        QueueCommand::Flush { id, select } => (act(Action::Flush, id, select, false), false),
        QueueCommand::Delete { id, select, all } => (act(Action::Delete, id, select, all), false),
        QueueCommand::Hold { id, select, all } => (act(Action::Hold, id, select, all), false),
        QueueCommand::Release { id, select, all } => (act(Action::Release, id, select, all), false),
        QueueCommand::Summary { select, json } => {
            (Request::Summary(select.selector(None, false)), json)
        }
        QueueCommand::Suspend { domain, for_ } => (
            Request::Suspend {
                domain,
                for_secs: for_.map(|d| d.0.as_secs()),
            },
            false,
        ),
        QueueCommand::Resume { domain } => (Request::Resume { domain }, false),
        QueueCommand::Suspended { json } => (Request::Suspended, json),
    };
    let single = matches!(req, Request::Show { .. });
    let acting = match &req {
        Request::Act { action, selector } => Some((*action, selector.is_empty())),
        _ => None,
    };
    let answer = control::run(&spool, req).map_err(anyhow::Error::msg)?;
    match answer {
        Answer::Entries { messages } if json => {
            let text = if single {
                serde_json::to_string_pretty(&messages.first())?
            } else {
                serde_json::to_string_pretty(&messages)?
            };
            println!("{text}");
        }
        Answer::Entries { messages } => {
            for e in &messages {
                print_entry(e);
            }
            if !single {
                println!("-- {} message(s)", messages.len());
            }
        }
        Answer::Acted { ids } => {
            // One message by id, or a flush of everything, says nothing, as before.
            if let Some((action, false)) = acting {
                let verb = match action {
                    Action::Flush => "flushed",
                    Action::Hold => "held",
                    Action::Release => "released",
                    Action::Delete => "deleted",
                };
                println!("{verb} {} message(s)", ids.len());
            }
        }
        Answer::Summary(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
        Answer::Summary(s) => print_summary(&s),
        Answer::Suspensions { suspended } if json => {
            println!("{}", serde_json::to_string_pretty(&suspended)?)
        }
        Answer::Suspensions { suspended } => {
            let now = postern::delivery::state::unix_now();
            for s in &suspended {
                match s.until {
                    Some(t) => println!("{}  for {}s more", s.domain, t.saturating_sub(now)),
                    None => println!("{}  until resumed", s.domain),
                }
            }
            println!("-- {} domain(s) suspended", suspended.len());
        }
    }
    Ok(())
}

fn print_summary(s: &Summary) {
    let width = s
        .destinations
        .iter()
        .map(|r| r.domain.len())
        .max()
        .unwrap_or(0)
        .max(5);
    print!("{:>width$} {:>6}", "", "T");
    for b in &s.buckets {
        print!(" {b:>6}");
    }
    println!();
    for row in std::iter::once(&s.total).chain(&s.destinations) {
        print!("{:>width$} {:>6}", row.domain, row.messages);
        for n in &row.counts {
            print!(" {n:>6}");
        }
        println!();
    }
}

fn print_entry(e: &Entry) {
    let sender = if e.sender.is_empty() { "<>" } else { &e.sender };
    let next = match e.next_attempt {
        Some(t) => format!("next in {}s", t.saturating_sub(e.received + e.age)),
        None => String::new(),
    };
    println!(
        "{}  {:>6}s {:>8}B  {:<8} attempts={} {}  {}",
        e.id, e.age, e.size, e.state, e.attempts, next, sender
    );
    if let Some(reason) = &e.hold_reason {
        let why = if e.state == "quarantine" {
            "quarantined"
        } else {
            "held"
        };
        println!("    {why}: {reason}");
    }
    for r in &e.recipients {
        println!(
            "    {} ({}, {} attempt(s)){}",
            r.address,
            serde_json::to_value(r.state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.attempts,
            r.last_reply
                .as_deref()
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        );
    }
    if let Some(record) = &e.record {
        if let Some(client) = &record.client {
            println!(
                "    from {} (helo {}) on {}{}",
                client.peer,
                client.helo.as_deref().unwrap_or("?"),
                client.local,
                client
                    .auth_user
                    .as_deref()
                    .map(|u| format!(", authenticated as {u}"))
                    .unwrap_or_default()
            );
        }
        for (plugin, key, value) in record.metadata.iter() {
            println!("    metadata {plugin}.{key} = {}", value.escape_debug());
        }
    }
}
