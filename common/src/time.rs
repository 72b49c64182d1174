//! Dates as mail and logs write them, in local time: RFC 5322 headers,
//! asctime(3) for mbox `From ` lines, Postfix's 15-character ctime for
//! statistics lines; and the UTC calendar arithmetic the day-based
//! features share (TLS-RPT days, warm-up days, queue-file date stamps).

const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 of the proleptic Gregorian date `y-m-d`
/// (Howard Hinnant's `days_from_civil`: no table, no time zone).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `(year, month, day)` of `days` since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`), the inverse of [`days_from_civil`].
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

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

    #[test]
    fn civil_days_round_trip() {
        use super::{civil_from_days, days_from_civil};
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11017);
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
        for d in [-1, 0, 59, 365, 11016, 20_000, 40_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }
}
