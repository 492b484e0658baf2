//! SMTP command lines: the line splitter and the command parser, on any
//! bytes a client may send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::codec::{next_command_line, CommandLine};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match next_command_line(rest) {
            CommandLine::Line(n) => {
                let _ = postern::smtp::command::parse(&rest[..n]);
                rest = &rest[n..];
            }
            CommandLine::TooLong(n) => rest = &rest[n..],
            CommandLine::Incomplete => {
                let _ = postern::smtp::command::parse(rest);
                break;
            }
        }
    }
});
