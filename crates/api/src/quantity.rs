//! Kubernetes resource quantities ("100m", "1.5Gi", "2e3").

/// Parses a quantity into thousandths of its unit (millicores for cpu, millibytes for
/// memory), so fractional cpu and large memory both fit exactly enough.
pub fn parse_milli(s: &str) -> Result<i128, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty quantity".into());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let (sign, digits) = match num.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, num.strip_prefix('+').unwrap_or(num)),
    };
    if digits.is_empty()
        || digits.matches('.').count() > 1
        || digits.contains(['+', '-'])
        || digits == "."
    {
        return Err(format!(
            "quantity {s:?} must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
        ));
    }
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    let int: i128 = if int_part.is_empty() {
        0
    } else {
        int_part
            .parse()
            .map_err(|_| format!("quantity {s:?} is too large"))?
    };
    // Value in units of 10^-9 to keep fractions like "0.5" and "1n" exact.
    let mut frac_nanos: i128 = 0;
    for (i, c) in frac_part.chars().take(9).enumerate() {
        frac_nanos += (c as i128 - '0' as i128) * 10i128.pow(8 - i as u32);
    }
    let nanos = int
        .checked_mul(1_000_000_000)
        .and_then(|v| v.checked_add(frac_nanos))
        .ok_or_else(|| format!("quantity {s:?} is too large"))?;
    let (mul_num, mul_den): (i128, i128) = match suffix {
        "" => (1, 1),
        "n" => (1, 1_000_000_000),
        "u" => (1, 1_000_000),
        "m" => (1, 1_000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..]
                .parse()
                .map_err(|_| format!("quantity {s:?} has an invalid exponent"))?;
            if !(-18..=18).contains(&exp) {
                return Err(format!("quantity {s:?} is out of range"));
            }
            if exp >= 0 {
                (10i128.pow(exp as u32), 1)
            } else {
                (1, 10i128.pow((-exp) as u32))
            }
        }
        other => return Err(format!("quantity {s:?} has an unknown suffix {other:?}")),
    };
    let milli = nanos
        .checked_mul(mul_num)
        .map(|v| v / mul_den / 1_000_000)
        .ok_or_else(|| format!("quantity {s:?} is too large"))?;
    Ok(sign * milli)
}

#[cfg(test)]
mod tests {
    use super::parse_milli;

    #[test]
    fn parses_the_kubernetes_forms() {
        assert_eq!(parse_milli("100m"), Ok(100));
        assert_eq!(parse_milli("2"), Ok(2000));
        assert_eq!(parse_milli("0.5"), Ok(500));
        assert_eq!(parse_milli("1Ki"), Ok(1024 * 1000));
        assert_eq!(parse_milli("1.5Gi"), Ok(1_610_612_736_000));
        assert_eq!(parse_milli("2e3"), Ok(2_000_000));
        assert_eq!(parse_milli("1k"), Ok(1_000_000));
        assert!(parse_milli("abc").is_err());
        assert!(parse_milli("1..2").is_err());
        assert!(parse_milli("12Q").is_err());
        assert!(parse_milli("").is_err());
    }
}
