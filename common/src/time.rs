//! Dates as mail headers write them (RFC 5322), in local time.

/// `Sun, 22 Nov 2026 14:11:42 +0100 (CET)` for `secs` since the epoch.
pub fn rfc5322_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // SAFETY: localtime_r with valid pointers; tm_zone points to static data.
    unsafe {
        let t = secs as libc::time_t;
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        let off = tm.tm_gmtoff / 60;
        let sign = if off < 0 { '-' } else { '+' };
        let zone = if tm.tm_zone.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(tm.tm_zone)
                .to_string_lossy()
                .into_owned()
        };
        let mut s = format!(
            "{}, {} {} {} {:02}:{:02}:{:02} {}{:02}{:02}",
            DAYS[tm.tm_wday.clamp(0, 6) as usize],
            tm.tm_mday,
            MONTHS[tm.tm_mon.clamp(0, 11) as usize],
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
