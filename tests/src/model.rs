//! The reference model: applying each user's batches in order to an in-memory map gives the
//! state MongoDB must end up in.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// `(collection, id) -> row` after applying ops in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub rows: BTreeMap<(String, String), Map<String, Value>>,
}

impl Model {
    /// Applies one op given in the seed or SDK spelling.
    pub fn apply(&mut self, op: &Value) {
        let kind = op["op"].as_str().expect("op");
        let table = op
            .get("table")
            .or_else(|| op.get("type"))
            .and_then(Value::as_str)
            .expect("table");
        let id = op["id"].as_str().expect("id").to_owned();
        let key = (table.to_owned(), id.clone());
        let mut data = op.get("data").and_then(Value::as_object).cloned().unwrap_or_default();
        data.remove("id");
        match kind {
            "PUT" => {
                self.rows.insert(key, data);
            }
            "PATCH" => {
                if let Some(row) = self.rows.get_mut(&key) {
                    for (k, v) in data {
                        row.insert(k, v);
                    }
                }
            }
            "DELETE" => {
                self.rows.remove(&key);
            }
            other => panic!("unknown op {other}"),
        }
    }

    pub fn apply_batch(&mut self, ops: &[Value]) {
        for op in ops {
            self.apply(op);
        }
    }

    /// The model restricted to one collection, as `id -> row`.
    pub fn collection(&self, name: &str) -> BTreeMap<String, Map<String, Value>> {
        self.rows
            .iter()
            .filter(|((c, _), _)| c == name)
            .map(|((_, id), row)| (id.clone(), row.clone()))
            .collect()
    }
}
