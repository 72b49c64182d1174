//! postconf(5), made from the parameter tables (`postconf --man`), so
//! that the page lists every parameter with the default and the status
//! the programs use. man/postconf.5 is this output; a test keeps the two
//! equal.

use postern_conf::params;
use postern_conf::postfix_params::{self, Status, TRANSPORT_SUFFIXES};

/// Text made safe for a roff line: backslashes escaped, and a leading
/// `.` or `'` kept from being read as a request.
fn roff(text: &str) -> String {
    let t = text.replace('\\', "\\e");
    if t.starts_with(['.', '\'']) {
        format!("\\&{t}")
    } else {
        t
    }
}

fn status_text(status: Status, why: &str) -> String {
    let what = match status {
        Status::Honoured => "Honoured",
        Status::Ignored => "Harmlessly ignored",
        Status::Other => "Done another way",
        Status::Unsupported => "Not offered",
    };
    if why.is_empty() {
        format!("{what}.")
    } else {
        format!("{what}: {why}.")
    }
}

const HEAD: &str = r#".TH POSTCONF 5 "" "Postern" "File Formats"
.ad l
.hy 0
.SH NAME
postconf \- Postern configuration parameters
.SH SYNOPSIS
.B /etc/postern/main.cf
.SH DESCRIPTION
Postern reads the parameters of
.B main.cf
in the configuration directory, in Postfix's syntax:
.IP
.B name = value
.PP
A line that starts with white space continues the one before it; a line
that starts with
.B #
is a comment; the last setting of a name wins.
A value may refer to other parameters as
.BR $name ,
.B ${name}
or
.BR $(name) ,
and as
.B ${name?text}
(text when the parameter is not empty) or
.B ${name:text}
(text when it is empty); references are expanded when the value is read.
master.cf may override a parameter for one service with
.BR "\-o name=value" .
.PP
Postern accepts every parameter of Postfix 3.7, so that a Postfix
main.cf gives no "unused parameter" warnings.
Each parameter below is one of:
.TP
.B Honoured
Postern reads it and acts as Postfix does (its default may differ; then
Postfix's is shown too).
.TP
.B Harmlessly ignored
Postern accepts it and nothing changes when it is set.
.TP
.B Done another way
Postern does the job of the feature another way, as the entry says.
.TP
.B Not offered
Postern does not offer the feature: setting the parameter has no effect.
.PP
This page is made by
.B postconf \-\-man
from the parameter table the programs use (conf/src/params.rs and
conf/postfix\-params.tsv), so it cannot disagree with them.
.B postconf \-d
prints every default,
.B postconf \-n
the settings of main.cf.
"#;

const TAIL: &str = r#".SH "PER-TRANSPORT PARAMETERS"
For each delivery service of master.cf (a
.B unix
service running smtp, lmtp, local, virtual, pipe or error), Postfix and
Postern know these parameters, named after the service, with the
.B default_
form (or the form named) as their default;
.B postconf \-d
lists them.
"#;

/// The whole page.
pub fn page() -> String {
    let mut out = String::from(HEAD);
    out.push_str(".SH PARAMETERS\n");
    let mut names: Vec<&str> = params::PARAMS
        .iter()
        .map(|(n, _)| *n)
        .chain(postfix_params::all().iter().map(|r| r.name))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let postfix = postfix_params::find(name);
        let (status, why) = postfix_params::status_of(name).unwrap_or((Status::Honoured, ""));
        out.push_str(&format!(".TP\n.B {}\n", roff(name)));
        // Config computes these from the machine.
        let computed = ["myhostname", "mydomain", "mynetworks"].contains(&name);
        match (params::default_of(name), postfix) {
            _ if computed => out
                .push_str("Default: computed from the machine (\\fBpostconf \\-d\\fR shows it).\n"),
            (Some(ours), Some(pf)) => {
                out.push_str(&default_line("Default", ours));
                if pf.postfix_default != ours && !pf.postfix_default.is_empty() {
                    out.push_str(".br\n");
                    out.push_str(&default_line("Postfix 3.7's default", pf.postfix_default));
                }
            }
            (Some(ours), None) => {
                out.push_str(&default_line("Default", ours));
                out.push_str(".br\nA Postern parameter: Postfix has none of this name.\n");
            }
            (None, Some(pf)) => out.push_str(&default_line("Default", pf.postfix_default)),
            (None, None) => {}
        }
        out.push_str(".br\n");
        out.push_str(&roff(&status_text(status, why)));
        out.push('\n');
    }
    out.push_str(TAIL);
    for s in TRANSPORT_SUFFIXES {
        out.push_str(&format!(
            ".TP\n.IB transport _{}\nDefault: \\fB{}\\fR.\n.br\n{}\n",
            roff(s.suffix),
            roff(s.default),
            roff(&status_text(s.status, s.why))
        ));
    }
    out.push_str(
        ".TP\n.IB transport _time_limit\nFor pipe services. Default: \\fB$command_time_limit\\fR.\n.br\nHonoured.\n",
    );
    out.push_str(
        ".SH \"SEE ALSO\"\npostconf(1), master(5), postern(1), smtpd(8), smtp(8), local(8), qmgr(8)\n",
    );
    out
}

/// A value made safe for roff, with a break point (`\\:`) every 40
/// characters of a long word, so that a long default still fits the page.
fn breakable(value: &str) -> String {
    let pieces: Vec<String> = value
        .split(' ')
        .map(|word| {
            let chars: Vec<char> = word.chars().collect();
            chars
                .chunks(40)
                .map(|c| {
                    roff(&c.iter().collect::<String>())
                        .trim_start_matches("\\&")
                        .to_string()
                })
                .collect::<Vec<_>>()
                .join("\\:")
        })
        .collect();
    let out = pieces.join(" ");
    if out.starts_with(['.', '\'']) {
        format!("\\&{out}")
    } else {
        out
    }
}

/// `What: value` (the value in bold).
fn default_line(what: &str, value: &str) -> String {
    if value.is_empty() {
        format!("{what}: empty.\n")
    } else {
        format!("{what}: \\fB{}\\fR\n", breakable(value))
    }
}
