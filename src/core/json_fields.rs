//! Reads the filter configuration's objects out of a `serde_json::Value` by hand. serde's derive
//! generated one visitor per struct and per field type, about 100 KB of keygate.wasm for code
//! that runs once at configure time; these few non-generic readers do the same job. Refusals
//! keep serde's wording (`unknown field `x`, expected one of ...`, `invalid type: ..., expected
//! a boolean`) and name the field's path. A field given as `null` counts as left out.

use serde_json::{Map, Value};

use super::config_error::ConfigError;

/// One JSON object of the configuration, its path (`credentials[0]`) and its allowed fields.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Fields<'a> {
    /// `value` as an object whose fields are all in `known` (unknown fields are refused).
    #[inline(never)]
    pub fn of(value: &'a Value, path: &'a str, known: &[&str]) -> Result<Self, ConfigError> {
        let Value::Object(map) = value else {
            return Err(invalid_type(path, value, "a map"));
        };
        if let Some(name) = map.keys().find(|name| !known.contains(&name.as_str())) {
            return Err(ConfigError::new(
                path,
                format!("unknown field `{name}`, expected {}", one_of(known)),
            ));
        }
        Ok(Fields { map, path })
    }

    /// The path of field `name`, for refusals (`credentials[0].name`).
    #[inline(never)]
    pub fn path_of(&self, name: &str) -> String {
        join(self.path, name)
    }

    /// The field's value, `None` when it is absent or `null`.
    #[inline(never)]
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    #[inline(never)]
    pub fn string(&self, name: &str) -> Result<Option<String>, ConfigError> {
        self.get(name)
            .map(|v| string(v, &self.path_of(name)))
            .transpose()
    }

    /// Sets each slot to its field's text, in `names` order; a field left out keeps its slot's
    /// default.
    #[inline(never)]
    pub fn strings_into(
        &self,
        names: &[&str],
        slots: &mut [&mut String],
    ) -> Result<(), ConfigError> {
        for (name, slot) in names.iter().zip(slots.iter_mut()) {
            if let Some(text) = self.string(name)? {
                **slot = text;
            }
        }
        Ok(())
    }

    /// A nested value read by its own `decode`, given the value and its path; `None` when the
    /// field is absent or `null`.
    pub fn decoded<T>(
        &self,
        name: &str,
        decode: fn(&Value, &str) -> Result<T, ConfigError>,
    ) -> Result<Option<T>, ConfigError> {
        self.get(name)
            .map(|v| decode(v, &self.path_of(name)))
            .transpose()
    }

    #[inline(never)]
    pub fn required_string(&self, name: &str) -> Result<String, ConfigError> {
        self.string(name)?.ok_or_else(|| self.missing(name))
    }

    #[inline(never)]
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(invalid_type(&self.path_of(name), v, "a boolean")),
        }
    }

    #[inline(never)]
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ConfigError> {
        self.get(name)
            .map(|v| unsigned(v, &self.path_of(name), u64::MAX, "u64"))
            .transpose()
    }

    #[inline(never)]
    pub fn u32(&self, name: &str) -> Result<Option<u32>, ConfigError> {
        let max = u64::from(u32::MAX);
        // In range by the check in `unsigned`.
        self.get(name)
            .map(|v| unsigned(v, &self.path_of(name), max, "u32").map(|n| n as u32))
            .transpose()
    }

    /// A list of strings; absent is empty.
    #[inline(never)]
    pub fn strings(&self, name: &str) -> Result<Vec<String>, ConfigError> {
        let path = self.path_of(name);
        self.array(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| string(v, &format!("{path}[{i}]")))
            .collect()
    }

    /// A list; absent is empty.
    #[inline(never)]
    pub fn array(&self, name: &str) -> Result<&'a [Value], ConfigError> {
        match self.get(name) {
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(v) => Err(invalid_type(&self.path_of(name), v, "a sequence")),
        }
    }

    /// A map; absent is empty.
    #[inline(never)]
    pub fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(map)),
            Some(v) => Err(invalid_type(&self.path_of(name), v, "a map")),
        }
    }

    /// One of the named `variants` (`"in": "header"`).
    #[inline(never)]
    pub fn variant<T: Copy>(
        &self,
        name: &str,
        variants: &[(&str, T)],
    ) -> Result<Option<T>, ConfigError> {
        self.get(name)
            .map(|v| variant(v, &self.path_of(name), variants))
            .transpose()
    }

    #[inline(never)]
    pub fn missing(&self, name: &str) -> ConfigError {
        ConfigError::new(self.path, format!("missing field `{name}`"))
    }
}

/// `value` as one of the named `variants`.
#[inline(never)]
pub fn variant<T: Copy>(
    value: &Value,
    path: &str,
    variants: &[(&str, T)],
) -> Result<T, ConfigError> {
    let text = string_ref(value, path)?;
    variants
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = variants.iter().map(|(name, _)| *name).collect();
            ConfigError::new(
                path,
                format!("unknown variant `{text}`, expected {}", one_of(&names)),
            )
        })
}

#[inline(never)]
pub fn string(value: &Value, path: &str) -> Result<String, ConfigError> {
    string_ref(value, path).map(str::to_string)
}

#[inline(never)]
fn string_ref<'v>(value: &'v Value, path: &str) -> Result<&'v str, ConfigError> {
    value
        .as_str()
        .ok_or_else(|| invalid_type(path, value, "a string"))
}

#[inline(never)]
fn unsigned(value: &Value, path: &str, max: u64, type_name: &str) -> Result<u64, ConfigError> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ if n.is_f64() => Err(invalid_type(path, value, type_name)),
            _ => Err(ConfigError::new(
                path,
                format!("invalid value: integer `{n}`, expected {type_name}"),
            )),
        },
        _ => Err(invalid_type(path, value, type_name)),
    }
}

/// `credentials` + `0` → `credentials.0`; a path of `""` is the document itself.
#[inline(never)]
pub fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// serde's wording for a value of the wrong JSON type.
#[inline(never)]
pub fn invalid_type(path: &str, value: &Value, expected: &str) -> ConfigError {
    let found = match value {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean `{b}`"),
        Value::Number(n) if n.is_f64() => format!("floating point `{n}`"),
        Value::Number(n) => format!("integer `{n}`"),
        Value::String(s) => format!("string \"{s}\""),
        Value::Array(_) => "sequence".to_string(),
        Value::Object(_) => "map".to_string(),
    };
    ConfigError::new(path, format!("invalid type: {found}, expected {expected}"))
}

/// serde's list of the names it expected: `a`, `a` or `b`, one of `a`, `b`, `c`.
#[inline(never)]
fn one_of(names: &[&str]) -> String {
    match names {
        [] => "nothing".to_string(),
        [one] => format!("`{one}`"),
        [a, b] => format!("`{a}` or `{b}`"),
        _ => {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            format!("one of {}", quoted.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KNOWN: &[&str] = &["name", "count", "on", "list", "kind"];

    #[test]
    fn an_unknown_field_is_refused_naming_it_and_the_known_ones() {
        let doc = json!({"nmae": "x"});
        let err = Fields::of(&doc, "a[0]", KNOWN).err().unwrap();
        assert_eq!(err.path, "a[0]");
        assert_eq!(
            err.message,
            "unknown field `nmae`, expected one of `name`, `count`, `on`, `list`, `kind`"
        );
    }

    #[test]
    fn each_reader_names_the_field_and_the_type_it_expected() {
        let doc = json!({"name": 1, "count": "2", "on": "yes", "list": ["a", 3], "kind": "c"});
        let fields = Fields::of(&doc, "x", KNOWN).unwrap();
        let err = fields.string("name").unwrap_err();
        assert_eq!(
            (err.path.as_str(), err.message.as_str()),
            ("x.name", "invalid type: integer `1`, expected a string")
        );
        let err = fields.u64("count").unwrap_err();
        assert_eq!(err.message, "invalid type: string \"2\", expected u64");
        let err = fields.bool("on").unwrap_err();
        assert_eq!(
            err.message,
            "invalid type: string \"yes\", expected a boolean"
        );
        let err = fields.strings("list").unwrap_err();
        assert_eq!(err.path, "x.list[1]");
        let err = fields.variant("kind", &[("a", 1), ("b", 2)]).unwrap_err();
        assert_eq!(err.message, "unknown variant `c`, expected `a` or `b`");
        assert_eq!(
            fields.required_string("missing").unwrap_err().message,
            "missing field `missing`"
        );
    }

    #[test]
    fn numbers_out_of_range_and_negative_are_refused_null_is_absent() {
        let doc = json!({"count": 5_000_000_000u64, "on": null, "name": -1, "list": 1.5});
        let fields = Fields::of(&doc, "", KNOWN).unwrap();
        assert_eq!(
            fields.u32("count").unwrap_err().message,
            "invalid value: integer `5000000000`, expected u32"
        );
        assert_eq!(fields.u64("count").unwrap(), Some(5_000_000_000));
        assert_eq!(
            fields.u64("name").unwrap_err().message,
            "invalid value: integer `-1`, expected u64"
        );
        assert_eq!(
            fields.u64("list").unwrap_err().message,
            "invalid type: floating point `1.5`, expected u64"
        );
        assert_eq!(fields.bool("on").unwrap(), None);
        assert_eq!(fields.path_of("on"), "on");
    }
}
