//! Dates as mail and logs write them, in local time: RFC 5322 headers,
//! asctime(3) for mbox `From ` lines, Postfix's 15-character ctime for
//! statistics lines.

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The broken-down local time of `secs` since the epoch.
fn local_tm(secs: u64) -> libc::tm {
    // SAFETY: localtime_r with valid pointers.
    unsafe {
        let t = secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        tm
    }
}

fn day(tm: &libc::tm) -> &'static str {
    DAYS[tm.tm_wday.clamp(0, 6) as usize]
}

fn month(tm: &libc::tm) -> &'static str {
    MONTHS[tm.tm_mon.clamp(0, 11) as usize]
}

/// `Sun, 22 Nov 2026 14:11:42 +0100 (CET)` for `secs` since the epoch.
pub fn rfc5322_date(secs: u64) -> String {
    let tm = local_tm(secs);
    let off = tm.tm_gmtoff / 60;
    let sign = if off < 0 { '-' } else { '+' };
    let zone = if tm.tm_zone.is_null() {
        String::new()
    } else {
        // SAFETY: tm_zone points to static data set by localtime_r.
        unsafe { std::ffi::CStr::from_ptr(tm.tm_zone) }
            .to_string_lossy()
            .into_owned()
    };
    let mut s = format!(
        "{}, {} {} {} {:02}:{:02}:{:02} {}{:02}{:02}",
        day(&tm),
        tm.tm_mday,
        month(&tm),
        tm.tm_year + 1900,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        sign,
        off.abs() / 60,
        off.abs() % 60
    );
    if !zone.is_empty() && zone.chars().all(|c| c.is_ascii_alphanumeric()) {
        s.push_str(&format!(" ({zone})"));
    }
    s
}

/// `Sat Nov 22 14:11:42 2025` (asctime(3), as in an mbox `From ` line).
pub fn asctime(secs: u64) -> String {
    let tm = local_tm(secs);
    format!(
        "{} {} {:2} {:02}:{:02}:{:02} {}",
        day(&tm),
        month(&tm),
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        tm.tm_year + 1900
    )
}

/// `Nov 22 17:00:01` (what Postfix takes of ctime(3)).
pub fn ctime15(secs: u64) -> String {
    let tm = local_tm(secs);
    format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        month(&tm),
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn shape() {
        let d = super::rfc5322_date(1_700_000_000);
        assert!(d.contains(" 2023 "), "{d}");
        assert!(d.split(' ').nth(5).unwrap().len() == 5, "{d}");
    }
}
