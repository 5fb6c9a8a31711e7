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

/// The label value for a city name: spaces become hyphens (`New-York-City`).
pub fn city_label(name: &str) -> String {
    name.replace(' ', "-")
}

/// A city by name or label value, case-insensitively (`new york city`,
/// `New-York-City`).
pub fn city(name: &str) -> Option<&'static City> {
    let norm = |s: &str| s.to_lowercase().replace(['-', '_'], " ");
    let want = norm(name);
    CITIES.iter().find(|c| norm(&c.name) == want)
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
