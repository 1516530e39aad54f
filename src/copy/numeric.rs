//! Canonical numeric text: what PostgreSQL 15 prints for `numeric_out(numeric_in(x))` when `x` is
//! the text of a JSON number.
//!
//! This owns the parsing of a JSON number token (strict JSON grammar), PostgreSQL's storage limits
//! for `numeric`, and the digit layout of the canonical text. It never uses floating point: the
//! canonical text is assembled from the digits exactly as written, shifted by the exponent.
//!
//! Mirrors `src/backend/utils/adt/numeric.c` in PostgreSQL 15: `set_var_from_str` (display scale
//! and exponent handling), `make_result_opt_error` (the `int16` weight and 14-bit dscale limits that
//! raise "value overflows numeric format") and `get_str_from_var` (the output layout).

use super::{Sink, ValueError};

/// `numeric_in` refuses an exponent `e` unless `-(INT_MAX / 2) < e < INT_MAX / 2`
/// (`set_var_from_str`), even when the value is zero.
const EXPONENT_LIMIT: i64 = (i32::MAX / 2) as i64;

/// Most decimal digits before the decimal point: the weight is an `int16` counting base-10000
/// digits, so at most `(NUMERIC_WEIGHT_MAX + 1) * DEC_DIGITS = 32768 * 4` decimal digits.
const MAX_INTEGER_DIGITS: i64 = 131_072;

/// Most digits after the decimal point: `NUMERIC_DSCALE_MAX` (the dscale is a 14-bit field).
const MAX_DSCALE: i64 = 16_383;

/// A JSON number checked against PostgreSQL's `numeric` limits, ready to be written in canonical
/// form. It borrows the digits from the input text; nothing is allocated.
///
/// The digits are the virtual concatenation `int ++ frac`; `point` is the position of the decimal
/// point in that digit string once the exponent is applied (it may lie before the first digit or
/// past the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Numeric<'a> {
    /// The number had a leading `-` (ignored when the value is zero).
    negative: bool,
    /// The integer digits exactly as written (never empty).
    int: &'a str,
    /// The fraction digits exactly as written (empty when there was no `.`).
    frac: &'a str,
    /// Decimal point position in `int ++ frac`: `int.len() + exponent`.
    point: i64,
    /// Display scale: digits printed after the decimal point, `max(0, frac.len() - exponent)`.
    dscale: i64,
    /// Index in `int ++ frac` of the first non-zero digit, `None` when the value is zero.
    first_nonzero: Option<i64>,
}

/// Parses the text of one JSON number (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, nothing
/// around it) and checks that PostgreSQL's `numeric` can hold it.
///
/// # Errors
/// - [`ValueError::Malformed`] when `text` is not exactly one JSON number.
/// - [`ValueError::NumberOutOfRange`] when `numeric_in` would fail with "value overflows numeric
///   format": the exponent is not strictly between -1073741823 and 1073741823, the value has more
///   than 131072 digits before the decimal point, or its display scale exceeds 16383.
///   All of this is decided from the token's shape, before any output is produced.
pub(crate) fn parse(text: &str) -> Result<Numeric<'_>, ValueError> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i += 1;
    }

    // Integer part: a single 0, or a non-zero digit followed by digits.
    let int_start = i;
    match bytes.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i += count_digits(&bytes[i..]),
        _ => return Err(ValueError::Malformed),
    }
    let int = &text[int_start..i];

    // Optional fraction: a dot followed by at least one digit.
    let mut frac = "";
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        let n = count_digits(&bytes[i..]);
        if n == 0 {
            return Err(ValueError::Malformed);
        }
        frac = &text[i..i + n];
        i += n;
    }

    // Optional exponent: e or E, an optional sign, at least one digit.
    let mut exponent: i64 = 0;
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match bytes.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let n = count_digits(&bytes[i..]);
        if n == 0 {
            return Err(ValueError::Malformed);
        }
        let mut magnitude: i64 = 0;
        for &d in &bytes[i..i + n] {
            magnitude = magnitude * 10 + i64::from(d - b'0');
            if magnitude >= EXPONENT_LIMIT {
                // Any longer digit string only grows; leading zeros keep magnitude at 0.
                return Err(ValueError::NumberOutOfRange);
            }
        }
        i += n;
        exponent = if exp_negative { -magnitude } else { magnitude };
    }

    if i != bytes.len() {
        return Err(ValueError::Malformed);
    }

    let int_len = len_i64(int)?;
    let frac_len = len_i64(frac)?;
    let point = int_len
        .checked_add(exponent)
        .ok_or(ValueError::NumberOutOfRange)?;
    let dscale = frac_len
        .checked_sub(exponent)
        .ok_or(ValueError::NumberOutOfRange)?
        .max(0);
    if dscale > MAX_DSCALE {
        return Err(ValueError::NumberOutOfRange);
    }

    let first_nonzero = match int.bytes().position(|d| d != b'0') {
        Some(p) => Some(p),
        None => frac.bytes().position(|d| d != b'0').map(|p| int.len() + p),
    };
    let first_nonzero = first_nonzero.map(len_to_i64).transpose()?;
    let integer_digits = match first_nonzero {
        Some(f) if f < point => point - f,
        _ => 0,
    };
    if integer_digits > MAX_INTEGER_DIGITS {
        return Err(ValueError::NumberOutOfRange);
    }

    Ok(Numeric {
        negative,
        int,
        frac,
        point,
        dscale,
        first_nonzero,
    })
}

impl Numeric<'_> {
    /// Whether `text`, the token this number was parsed from, is already its canonical
    /// text: an integer without fraction or exponent that is not a negative zero (JSON
    /// allows no leading zeros). The common case, written without being rebuilt.
    pub(crate) fn is_canonical(&self, text: &str) -> bool {
        self.frac.is_empty()
            && text.len() == self.int.len() + usize::from(self.negative)
            && (self.first_nonzero.is_some() || !self.negative)
    }

    /// Writes the canonical text (as `numeric_out` prints it) to `sink`: a `-` for a negative
    /// non-zero value, the integer digits without leading zeros (at least `0`), and when the
    /// display scale is positive a `.` followed by exactly that many digits.
    pub(crate) fn write_to<S: Sink + ?Sized>(&self, sink: &mut S) {
        let len = self.int.len() as i64 + self.frac.len() as i64;
        if self.negative && self.first_nonzero.is_some() {
            sink.push("-");
        }
        match self.first_nonzero {
            Some(f) if f < self.point => {
                self.push_digits(f, self.point.min(len), sink);
                push_zeros(self.point - len, sink);
            }
            _ => sink.push("0"),
        }
        if self.dscale > 0 {
            // Here point + dscale == len: the fraction is every digit after the point, preceded
            // by zeros when the point lies before the first written digit.
            sink.push(".");
            push_zeros(-self.point, sink);
            self.push_digits(self.point.max(0), len, sink);
        }
    }

    /// Pushes the digits at positions `from..to` of `int ++ frac` (an empty range pushes nothing).
    fn push_digits<S: Sink + ?Sized>(&self, from: i64, to: i64, sink: &mut S) {
        let int_len = self.int.len() as i64;
        let int_range = from.min(int_len)..to.min(int_len);
        if int_range.start < int_range.end {
            sink.push(&self.int[int_range.start as usize..int_range.end as usize]);
        }
        let frac_range = (from.max(int_len) - int_len)..(to.max(int_len) - int_len);
        if frac_range.start < frac_range.end {
            sink.push(&self.frac[frac_range.start as usize..frac_range.end as usize]);
        }
    }
}

/// Pushes `n` zeros (nothing when `n <= 0`).
fn push_zeros<S: Sink + ?Sized>(mut n: i64, sink: &mut S) {
    const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    while n > 0 {
        let take = n.min(ZEROS.len() as i64);
        sink.push(&ZEROS[..take as usize]);
        n -= take;
    }
}

/// Number of leading ASCII digits in `bytes`.
fn count_digits(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// The length of `s` as `i64` (a `str` never comes close to `i64::MAX` bytes).
fn len_i64(s: &str) -> Result<i64, ValueError> {
    len_to_i64(s.len())
}

/// Converts a length or index to `i64`, treating the impossible overflow as out of range.
fn len_to_i64(n: usize) -> Result<i64, ValueError> {
    i64::try_from(n).map_err(|_| ValueError::NumberOutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canon(text: &str) -> Result<String, ValueError> {
        let n = parse(text)?;
        let mut s = String::new();
        n.write_to(&mut s);
        Ok(s)
    }

    fn ok(text: &str) -> String {
        canon(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn canonical_tokens_are_exactly_those_written_as_is() {
        for (text, canonical) in [
            ("0", true),
            ("7", true),
            ("-12", true),
            ("1234567890123456789012345678901234567890", true),
            ("-0", false),
            ("1e0", false),
            ("10E+2", false),
            ("1.0", false),
            ("-0.5", false),
        ] {
            let n = parse(text).expect("a number");
            assert_eq!(n.is_canonical(text), canonical, "{text}");
            if canonical {
                assert_eq!(ok(text), text);
            }
        }
    }

    #[test]
    fn examples_from_postgresql() {
        // Each checked against PostgreSQL 15.18 (`select 'x'::numeric`).
        let cases = [
            ("42", "42"),
            ("-42", "-42"),
            ("0", "0"),
            ("-0", "0"),
            ("-0.0", "0.0"),
            ("0.10", "0.10"),
            ("0.1", "0.1"),
            ("1e3", "1000"),
            ("1.50e1", "15.0"),
            ("1.0E+2", "100"),
            ("-1.5e-07", "-0.00000015"),
            ("1e-2", "0.01"),
            ("12.5e-1", "1.25"),
            ("0.00e5", "0"),
            ("0e-3", "0.000"),
            ("-0e-3", "0.000"),
            ("0.000001e131077", &format!("1{}", "0".repeat(131_071))),
            ("-9223372036854775808", "-9223372036854775808"),
            ("18446744073709551616", "18446744073709551616"),
            (
                "123456789012345678901234567890.123456789",
                "123456789012345678901234567890.123456789",
            ),
            ("0e1073741822", "0"),
            ("-0.000e1073741822", "0"),
            ("0e00000000000000000000000001", "0"),
            ("1E-0", "1"),
            ("1.5E+0", "1.5"),
        ];
        for (input, want) in cases {
            assert_eq!(ok(input), want, "input {input}");
        }
    }

    #[test]
    fn float_extremes() {
        assert_eq!(ok("1e308"), format!("1{}", "0".repeat(308)));
        assert_eq!(ok("5e-324"), format!("0.{}5", "0".repeat(323)));
        assert_eq!(
            ok("-1.7976931348623157e308"),
            format!("-17976931348623157{}", "0".repeat(292))
        );
    }

    #[test]
    fn limits_match_postgresql() {
        // Boundaries checked against PostgreSQL 15.18.
        assert_eq!(ok("1e131071").len(), 131_072);
        assert_eq!(canon("1e131072"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("0.1e131073"), Err(ValueError::NumberOutOfRange));
        assert_eq!(ok("1e-16383").len(), 16_385);
        assert_eq!(ok("0e-16383").len(), 16_385);
        assert_eq!(ok("1.0e-16382").len(), 16_385);
        assert_eq!(canon("1e-16384"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("0e-16384"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("100e-16385"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("0.00e-16382"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("0e1073741823"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("0e-1073741822"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("1e1073741823"), Err(ValueError::NumberOutOfRange));
        assert_eq!(canon("1e999999999"), Err(ValueError::NumberOutOfRange));
        assert_eq!(
            canon("1e99999999999999999999999999999"),
            Err(ValueError::NumberOutOfRange)
        );
        assert_eq!(
            canon("1e-99999999999999999999999999999"),
            Err(ValueError::NumberOutOfRange)
        );
        let many_digits = format!("1{}", "0".repeat(131_072));
        assert_eq!(canon(&many_digits), Err(ValueError::NumberOutOfRange));
        let long_fraction = format!("0.{}", "0".repeat(16_384));
        assert_eq!(canon(&long_fraction), Err(ValueError::NumberOutOfRange));
        let max_fraction = format!("0.{}1", "0".repeat(16_382));
        assert_eq!(ok(&max_fraction), max_fraction);
    }

    #[test]
    fn rejects_non_json_numbers() {
        for bad in [
            "", "-", "+1", "01", "-01", "1.", ".5", "1e", "1e+", "1E-", "1.e5", "0x10", "1 ", " 1",
            "NaN", "Infinity", "1.5.5", "1e5e5", "--1", "1_000", "١",
        ] {
            assert_eq!(canon(bad), Err(ValueError::Malformed), "input {bad:?}");
        }
    }

    /// A value in normalized form: sign, significant digits (no leading or trailing zeros) and the
    /// decimal exponent such that value = 0.digits × 10^exponent. Zero has no sign and no digits.
    fn normalize(negative: bool, digits: &str, point: i64) -> (bool, String, i64) {
        let lead = digits.bytes().take_while(|&b| b == b'0').count();
        let sig = digits[lead..].trim_end_matches('0');
        if sig.is_empty() {
            return (false, String::new(), 0);
        }
        (negative, sig.to_owned(), point - lead as i64)
    }

    proptest! {
        #[test]
        fn canonical_value_and_scale(
            negative in any::<bool>(),
            int in "0|[1-9][0-9]{0,25}",
            frac in proptest::option::of("[0-9]{1,25}"),
            exp in proptest::option::of((-60i64..60, any::<bool>(), any::<bool>())),
        ) {
            let mut text = String::new();
            if negative { text.push('-'); }
            text.push_str(&int);
            if let Some(f) = &frac { text.push('.'); text.push_str(f); }
            let e = exp.map_or(0, |(e, _, _)| e);
            if let Some((e, upper, plus)) = exp {
                text.push(if upper { 'E' } else { 'e' });
                if e >= 0 && plus { text.push('+'); }
                text.push_str(&e.to_string());
            }
            let out = ok(&text);
            if parse(&text).expect("parsed above").is_canonical(&text) {
                prop_assert_eq!(&out, &text);
            }

            // Output shape: -?(0|[1-9][0-9]*)(\.[0-9]+)?
            let (out_neg, body) = match out.strip_prefix('-') {
                Some(b) => (true, b),
                None => (false, out.as_str()),
            };
            let (out_int, out_frac) = body.split_once('.').unwrap_or((body, ""));
            prop_assert!(out_int == "0" || !out_int.starts_with('0'), "leading zero in {out}");
            prop_assert!(out_int.bytes().all(|b| b.is_ascii_digit()) && !out_int.is_empty());
            prop_assert!(out_frac.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(body.contains('.'), !out_frac.is_empty());

            // Scale as specified.
            let frac_len = frac.as_ref().map_or(0, |f| f.len() as i64);
            prop_assert_eq!(out_frac.len() as i64, (frac_len - e).max(0));

            // Same value.
            let in_digits = format!("{int}{}", frac.as_deref().unwrap_or(""));
            let want = normalize(negative, &in_digits, int.len() as i64 + e);
            let got = normalize(out_neg, &format!("{out_int}{out_frac}"), out_int.len() as i64);
            prop_assert_eq!(&got, &want, "{} -> {}", text, out);
            // A zero never prints a sign.
            prop_assert!(!(out_neg && want.1.is_empty()));
        }
    }
}
