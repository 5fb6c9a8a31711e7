//! Geography: the world's cities (`data/world-cities.csv`, compiled in), great-circle
//! distances and the round-trip-time estimate placement uses when no measured RTT
//! exists.

use std::sync::LazyLock;

/// Light in fibre covers about 200 km per millisecond; a round trip crosses the
/// distance twice.
pub const FIBRE_KM_PER_MS: f64 = 200.0;
/// Added to every estimate: last mile, switching, the server's own time.
pub const RTT_OVERHEAD_MS: f64 = 2.0;
/// The annotation on a Node with its coordinates, `LAT,LON` in degrees.
pub const COORDINATES_ANNOTATION: &str = "meridian.io/coordinates";
/// The annotation on a Node with measured round-trip times to named areas,
/// `Paris=3.2,Lyon=5.1` (milliseconds); preferred over estimates.
pub const MEASURED_RTT_ANNOTATION: &str = "meridian.io/measured-rtt";

#[derive(Clone, Debug, PartialEq)]
pub struct City {
    pub name: String,
    pub country_code: String,
    pub country: String,
    pub continent: String,
    /// The suggested Meridian region (`eu-west`, `cn-east`, ...).
    pub region: String,
    pub lat: f64,
    pub lon: f64,
    pub population: u64,
    pub timezone: String,
}

static CITIES: LazyLock<Vec<City>> = LazyLock::new(|| {
    include_str!("../../../data/world-cities.csv")
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() != 9 {
                return None;
            }
            Some(City {
                name: f[0].to_owned(),
                country_code: f[1].to_owned(),
                country: f[2].to_owned(),
                continent: f[3].to_owned(),
                region: f[4].to_owned(),
                lat: f[5].parse().ok()?,
                lon: f[6].parse().ok()?,
                population: f[7].parse().ok()?,
                timezone: f[8].to_owned(),
            })
        })
        .collect()
});

/// All 564 cities, most populous first.
pub fn cities() -> &'static [City] {
    &CITIES
}

/// The label value for a city name, always a valid label value: accents dropped,
/// spaces become hyphens, anything else not alphanumeric dropped
/// (`New-York-City`, `Sao-Paulo`, `Xian`).
pub fn city_label(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        let c = match c {
            'á' | 'à' | 'â' | 'ã' | 'ä' | 'ā' | 'ầ' => 'a',
            'Á' | 'À' | 'Â' | 'Ã' | 'Ä' | 'Ā' => 'A',
            'é' | 'è' | 'ê' | 'ë' | 'ē' | 'ế' => 'e',
            'É' | 'È' | 'Ê' | 'Ë' => 'E',
            'í' | 'ì' | 'î' | 'ï' | 'ī' | 'ı' => 'i',
            'Í' | 'İ' => 'I',
            'ó' | 'ò' | 'ô' | 'õ' | 'ö' | 'ō' | 'ơ' => 'o',
            'Ó' | 'Ö' => 'O',
            'ú' | 'ù' | 'û' | 'ü' | 'ū' => 'u',
            'Ú' | 'Ü' => 'U',
            'ç' => 'c',
            'ñ' => 'n',
            'ş' => 's',
            ' ' | '-' | '_' | '.' => '-',
            c if c.is_ascii_alphanumeric() => c,
            _ => continue,
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    while out.ends_with('-') {
        out.pop();
    }
    out.truncate(63);
    out
}

/// A city by name or label value, case-insensitively (`new york city`,
/// `New-York-City`).
pub fn city(name: &str) -> Option<&'static City> {
    static BY_LABEL: LazyLock<std::collections::HashMap<String, usize>> = LazyLock::new(|| {
        let mut m = std::collections::HashMap::new();
        for (i, c) in CITIES.iter().enumerate() {
            // The most populous city keeps a label two cities share.
            m.entry(city_label(&c.name).to_lowercase()).or_insert(i);
        }
        m
    });
    BY_LABEL
        .get(&city_label(name).to_lowercase())
        .map(|&i| &CITIES[i])
}

/// Parses `LAT,LON` in degrees.
pub fn parse_coordinates(s: &str) -> Result<(f64, f64), String> {
    let (lat, lon) = s.split_once(',').ok_or("coordinates are LAT,LON")?;
    let lat: f64 = lat
        .trim()
        .parse()
        .map_err(|_| format!("bad latitude {lat:?}"))?;
    let lon: f64 = lon
        .trim()
        .parse()
        .map_err(|_| format!("bad longitude {lon:?}"))?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("{lat},{lon} is not on Earth"));
    }
    Ok((lat, lon))
}

/// Great-circle distance in kilometres (haversine, mean Earth radius).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

/// Estimated round-trip time over `km` of fibre, in milliseconds.
pub fn estimate_rtt_ms(km: f64) -> f64 {
    RTT_OVERHEAD_MS + 2.0 * km / FIBRE_KM_PER_MS
}

/// Parses a measured-RTT annotation (`Paris=3.2,Lyon=5.1`); bad pairs are skipped.
pub fn parse_measured_rtt(s: &str) -> Vec<(String, f64)> {
    s.split(',')
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let v: f64 = v.trim().parse().ok()?;
            (v.is_finite() && v >= 0.0).then(|| (k.trim().to_owned(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_every_city_of_the_table() {
        assert_eq!(cities().len(), 564);
        let paris = city("paris").unwrap();
        assert_eq!(paris.region, "eu-west");
        assert_eq!(city("New-York-City").unwrap().country_code, "US");
        assert!(city("Atlantis").is_none());
    }

    #[test]
    fn every_city_has_a_valid_distinct_label() {
        let mut seen = std::collections::HashSet::new();
        for c in cities() {
            let l = city_label(&c.name);
            assert!(
                crate::validation::label_value_problem(&l).is_none() && !l.is_empty(),
                "{} -> {l:?}",
                c.name
            );
            seen.insert(l);
        }
        assert_eq!(city_label("São Paulo"), "Sao-Paulo");
        assert_eq!(city_label("Xi’an"), "Xian");
        assert_eq!(city("sao paulo").unwrap().name, "São Paulo");
        assert_eq!(city("Sao-Paulo").unwrap().name, "São Paulo");
        assert!(seen.len() >= cities().len() - 5, "labels collide");
    }

    #[test]
    fn estimates_rtt_from_distance() {
        let paris = city("Paris").unwrap();
        let london = city("London").unwrap();
        let km = distance_km((paris.lat, paris.lon), (london.lat, london.lon));
        assert!((330.0..360.0).contains(&km), "{km}");
        let rtt = estimate_rtt_ms(km);
        assert!((5.0..6.0).contains(&rtt), "{rtt}");
        assert_eq!(distance_km((10.0, 20.0), (10.0, 20.0)), 0.0);
        assert!(parse_coordinates("91,0").is_err());
        assert_eq!(
            parse_measured_rtt("Paris=3.2, bad, Lyon=x,Nice=-1,Rome=7"),
            vec![("Paris".to_owned(), 3.2), ("Rome".to_owned(), 7.0)]
        );
    }
}
