//! main.cf grammar against Postfix 3.7's own reading of the same files:
//! every `$name`/`${...}` form expanded by Postern's [`Config`] must equal
//! what `postconf -x` prints, and the "unused parameter" warnings must be
//! the same (hyphenated per-service names, names used only as macros,
//! restriction classes). Postfix's postconf is run with `-c` on a
//! temporary directory; scripts/test installs the `postfix` package.

use postern_conf::Config;
use std::path::{Path, PathBuf};
use std::process::Command;

const POSTFIX_POSTCONF: &str = "/usr/sbin/postconf";

/// A temporary configuration directory, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(main_cf: &str, master_cf: &str) -> Dir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("postern-grammar-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("main.cf"), main_cf).unwrap();
        std::fs::write(d.join("master.cf"), master_cf).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Postfix's postconf with `args` on `dir`: (stdout, stderr).
fn postfix(dir: &Path, args: &[&str]) -> (String, String) {
    assert!(
        Path::new(POSTFIX_POSTCONF).exists(),
        "{POSTFIX_POSTCONF} is missing: install the postfix package (scripts/test does)"
    );
    let out = Command::new(POSTFIX_POSTCONF)
        .arg("-c")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MASTER_CF: &str = "\
smtp      inet  n       -       y       -       -       smtpd
smtp      unix  -       -       y       -       -       smtp
smtp-amavis unix -      -       n       -       2       smtp
  -o smtp_data_done_timeout=1200
  -o smtp_helo_name=$amavis_helo
dovecot   unix  -       n       n       -       -       pipe
  flags=DRhu user=vmail argv=/usr/lib/dovecot/deliver -f ${sender} -d ${recipient}
policyd-spf unix -      n       n       -       0       spawn
  user=nobody argv=/usr/bin/policyd-spf
";

/// The forms of Postfix 2 and 3: each `tN` is listed in
/// smtpd_restriction_classes so that both postconfs print it.
const CASES: &[&str] = &[
    "$a_x-$myhostname",
    "${a_x}",
    "$(a_x)",
    "${a_x?on}",
    "${empty_x?on}",
    "${a_x:off}",
    "${empty_x:off}",
    "${unset_x:off}",
    "${a_x?{on}:{off}}",
    "${empty_x?{on}:{off}}",
    "${empty_x?{on}}",
    "${a_x?{ on }}",
    "${empty_x:{off}}",
    "${a_x?{$b_x}:{x}}",
    "${{$compatibility_level} <level {2} ? {old} : {new}}",
    "${{$compatibility_level} <level {3.6} ? {old} : {new}}",
    "${{$compatibility_level} >=level {3} ? {ge} : {lt}}",
    "${{10} < {9} ? {lt} : {ge}}",
    "${{abc} == {abc} ? {eq} : {ne}}",
    "${{abc} != {abc} ? {ne} : {eq}}",
    "${{$a_x} == {yes} ? {$b_x}}",
    "x$$y",
    "$user_macro world",
    "${a_x?plain text, with commas}",
];

#[test]
fn expansion_equals_postfix() {
    let mut main = String::from(
        "myhostname = mx.example.com\nmydomain = example.com\ncompatibility_level = 3.5\n\
         a_x = yes\nempty_x =\nb_x = bee\nuser_macro = hello\namavis_helo = amavis.example.com\n",
    );
    let mut names = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        main.push_str(&format!("t{i} = {c}\n"));
        names.push(format!("t{i}"));
    }
    main.push_str(&format!(
        "smtpd_restriction_classes = {}\n",
        names.join(", ")
    ));
    let d = Dir::new(&main, MASTER_CF);
    let args: Vec<&str> = std::iter::once("-x")
        .chain(names.iter().map(String::as_str))
        .collect();
    let (out, err) = postfix(&d.0, &args);
    let cfg = Config::load(&d.0).unwrap();
    for (i, line) in out.lines().enumerate() {
        let (name, want) = line
            .split_once(" =")
            .unwrap_or_else(|| panic!("postconf: {line}"));
        assert_eq!(name, names[i]);
        assert_eq!(
            cfg.get(name),
            want.trim_start(),
            "{name} = {} (Postfix's postconf stderr: {err})",
            CASES[i]
        );
    }
    assert_eq!(out.lines().count(), CASES.len(), "{err}");
}

/// The defaults compatibility_level changes, at three levels.
#[test]
fn compatibility_level_defaults_equal_postfix() {
    for level in ["0", "1", "2", "3.6"] {
        let main = format!("myhostname = mx.example.com\ncompatibility_level = {level}\n");
        let d = Dir::new(&main, MASTER_CF);
        let names = [
            "append_dot_mydomain",
            "mynetworks_style",
            "relay_domains",
            "smtputf8_enable",
        ];
        let mut args = vec!["-x"];
        args.extend(names);
        let (out, err) = postfix(&d.0, &args);
        let cfg = Config::load(&d.0).unwrap();
        for (line, name) in out.lines().zip(names) {
            let want = line.split_once(" =").unwrap().1.trim_start();
            assert_eq!(cfg.get(name), want, "{name} at level {level}: {err}");
        }
    }
}

/// "unused parameter" warnings as Postfix's postconf gives them.
#[test]
fn unused_parameters_equal_postfix() {
    let main = "myhostname = mx.example.com\n\
                smtp-amavis_destination_recipient_limit = 1\n\
                smtp-amavis_destination_concurrency_limit = 2\n\
                dovecot_destination_recipient_limit = 1\n\
                dovecot_time_limit = 3600\n\
                policyd-spf_time_limit = 3600\n\
                amavis_helo = amavis.example.com\n\
                used_by_macro = reject\n\
                smtpd_helo_restrictions = $used_by_macro\n\
                my_class = reject\n\
                smtpd_restriction_classes = my_class\n\
                not_used_x = 1\n";
    let d = Dir::new(main, MASTER_CF);
    let (_, err) = postfix(&d.0, &["-n"]);
    let mut theirs: Vec<String> = err
        .lines()
        .filter_map(|l| l.split_once("unused parameter: "))
        .map(|(_, nv)| nv.split('=').next().unwrap().to_string())
        .collect();
    theirs.sort();
    let cfg = Config::load(&d.0).unwrap();
    let mut ours: Vec<String> = cfg
        .unknown_parameters()
        .iter()
        .map(|(n, _)| n.clone())
        .collect();
    ours.sort();
    assert_eq!(ours, theirs, "Postfix's warnings: {err}");
    assert_eq!(ours, vec!["not_used_x".to_string()]);
    assert_eq!(
        cfg.get("smtp-amavis_destination_recipient_limit"),
        "1",
        "a hyphenated per-service name is read"
    );
}
