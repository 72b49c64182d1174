//! Unit tests of the resolver.
use super::*;
use std::path::Path;

fn resolver(text: &str) -> Resolver {
    let base = "myhostname = mx.example.test\nmydestination = $myhostname, localhost\n\
                inet_interfaces = 127.0.0.1\nlocal_recipient_maps =\n";
    let cfg = Config::from_text(
        Path::new("/nonexistent"),
        &format!("{base}{text}"),
        Path::new("main.cf"),
    )
    .unwrap();
    Resolver::with_recipient_checks(&cfg)
}

fn tn(r: &Resolver, a: &str) -> (Class, String, String) {
    let x = r.resolve(None, a).unwrap();
    (x.class, x.transport, x.nexthop)
}

fn c(class: Class, t: &str, n: &str) -> (Class, String, String) {
    (class, t.into(), n.into())
}

#[test]
fn classes_and_next_hops() {
    let r = resolver(
        "relay_domains = example.com\nvirtual_mailbox_domains = v.test\n\
         virtual_alias_domains = a.test\nrelayhost = [10.0.0.1]\n",
    );
    assert_eq!(tn(&r, "root"), c(Class::Local, "local", "mx.example.test"));
    assert_eq!(
        tn(&r, "x@LocalHost."),
        c(Class::Local, "local", "mx.example.test")
    );
    assert_eq!(
        tn(&r, "x@[127.0.0.1]"),
        c(Class::Local, "local", "mx.example.test")
    );
    assert_eq!(
        tn(&r, "u@sub.example.com"),
        c(Class::Relay, "relay", "[10.0.0.1]")
    );
    assert_eq!(
        tn(&r, "u@example.com"),
        c(Class::Relay, "relay", "[10.0.0.1]")
    );
    assert_eq!(tn(&r, "u@v.test"), c(Class::Virtual, "virtual", "v.test"));
    assert_eq!(
        tn(&r, "u@other.test"),
        c(Class::Default, "smtp", "[10.0.0.1]")
    );
    let a = r.resolve(None, "u@a.test").unwrap();
    assert_eq!((a.class, a.transport.as_str()), (Class::Alias, "error"));
    // Routing in the local part.
    let p = r.resolve(None, "u%other.test@localhost").unwrap();
    assert_eq!(
        (p.class, p.recipient.as_str()),
        (Class::Default, "u@other.test")
    );
    assert!(r.resolve(None, "u%x.test@other.test").unwrap().routed);
    assert!(r.resolve(None, "x@1.2.3.4").unwrap().bad_syntax);
}

#[test]
fn transport_maps_semantics() {
    let r = resolver(
        "relayhost = [10.0.0.1]\nrecipient_delimiter = +\n\
         transport_maps = inline:{ u@d.test=smtp:[h1], .sub.test=relay:, \
         kept.test=:[k], gone.test=error:, *=smtp:[wild] }\n",
    );
    assert_eq!(tn(&r, "u+x@d.test"), c(Class::Default, "smtp", "[h1]"));
    assert_eq!(tn(&r, "v@d.test"), c(Class::Default, "smtp", "[wild]"));
    assert_eq!(
        tn(&r, "v@a.sub.test"),
        c(Class::Default, "relay", "a.sub.test")
    );
    assert_eq!(tn(&r, "v@kept.test"), c(Class::Default, "smtp", "[k]"));
    assert_eq!(
        tn(&r, "v@gone.test"),
        c(Class::Default, "error", "Address is undeliverable")
    );
}

#[test]
fn sender_dependent_and_relocated() {
    let r = resolver(
        "relay_domains = r.test\nrelayhost = [10.0.0.1]\n\
         sender_dependent_default_transport_maps = inline:{ @corp.test=slow, <>=nulls }\n\
         sender_dependent_relayhost_maps = inline:{ boss@corp.test=[10.0.0.2], x@y.test=DUNNO }\n\
         relocated_maps = inline:{ gone@mx.example.test=new@else.test }\n",
    );
    let from = |s: Option<&str>, a: &str| {
        let x = r.resolve(s, a).unwrap();
        (x.transport, x.nexthop)
    };
    let tn = |t: &str, n: &str| (t.to_string(), n.to_string());
    assert_eq!(
        from(Some("a@corp.test"), "u@o.test"),
        tn("slow", "[10.0.0.1]")
    );
    assert_eq!(from(Some(""), "u@o.test"), tn("nulls", "[10.0.0.1]"));
    assert_eq!(from(None, "u@o.test"), tn("smtp", "[10.0.0.1]"));
    // The default transport map does not apply to relay domains; the
    // relay host map does.
    assert_eq!(
        from(Some("boss@corp.test"), "u@r.test"),
        tn("relay", "[10.0.0.2]")
    );
    assert_eq!(from(Some("x@y.test"), "u@o.test"), tn("smtp", "[10.0.0.1]"));
    assert_eq!(
        from(None, "gone@mx.example.test"),
        tn("error", "5.1.6 User has moved to new@else.test")
    );
    let e = r
        .check_listed(None, "gone@mx.example.test", false)
        .unwrap_err();
    assert_eq!((e.code, e.dsn.as_str()), (550, "5.1.6"));
}

#[test]
fn listed_recipients() {
    let r = resolver(
        "virtual_mailbox_domains = v.test\nvirtual_mailbox_maps = inline:{ box@v.test=x }\n\
         virtual_alias_maps = inline:{ postmaster@v.test=box@v.test, @c.test=box@v.test }\n\
         virtual_alias_domains = c.test\nrecipient_delimiter = +\n\
         relay_domains = r.test\nrelay_recipient_maps = inline:{ ok@r.test=x }\n",
    );
    assert!(r.check_listed(None, "postmaster@v.test", false).is_ok());
    assert!(r.check_listed(None, "box+tag@v.test", false).is_ok());
    assert!(r.check_listed(None, "anyone@c.test", false).is_ok());
    let e = r.check_listed(None, "nobody@v.test", false).unwrap_err();
    assert_eq!((e.code, e.dsn.as_str()), (550, "5.1.1"));
    assert_eq!(e.text, "User unknown in virtual mailbox table");
    assert!(r.check_listed(None, "ok@r.test", false).is_ok());
    assert!(r.check_listed(None, "no@r.test", false).is_err());
}
