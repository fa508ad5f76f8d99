//! Bad manifests, property-based: the ctl's YAML/JSON parser (`ctl::manifest::parse`) and the
//! CRD spec decoder it uses (`Spec::from_json`, the same proto3-JSON mapping the cluster syncers
//! decode CRD specs with) never panic on random, mutated, deep, aliased or huge documents; every
//! refusal names the document and the field; valid documents round-trip.
//!
//! Cases: proptest's default (256, or `PROPTEST_CASES`) divided by the weight in `cases`.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use serde_json::{Value, json};
use xpu_broker::{
    ctl::manifest::{self, API_VERSION},
    error::Error,
    model::{Kind, object::Spec},
};

fn cases(weight: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    c.cases = (c.cases / weight).max(1);
    c.failure_persistence = None;
    c
}

// ---- documents ----

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?"
}

/// A valid object of one of the seven kinds, in the CRD shape.
fn valid_doc() -> BoxedStrategy<Value> {
    let spec = prop_oneof![
        (1u32..4095, prop::option::of(1u32..16_777_215)).prop_map(|(vlan, vni)| {
            let mut s = json!({"vlanId": vlan});
            if let Some(v) = vni {
                s["vni"] = json!(v);
            }
            ("LogicalBridge", s)
        }),
        (0u8..=32).prop_map(|l| ("Vrf", json!({"loopbackIpPrefix": format!("10.255.0.1/{l}")}))),
        name().prop_map(|n| ("Svi", json!({"vrf": n, "logicalBridge": n, "gwIpPrefix": ["10.0.0.1/24"]}))),
        name().prop_map(|n| ("XpuNetwork", json!({"logicalBridges": [n], "ipam": {"cidr": "10.9.0.0/24"}}))),
        name().prop_map(|s| (
            "Netdev",
            json!({"netdevId": format!("{s}-pf0-vf1"), "hostname": "node-1", "network": "net-a"})
        )),
        name().prop_map(|r| (
            "FlowPolicy",
            json!({"rules": [{"name": r, "action": "deny", "protocol": "tcp", "dstPorts": [{"from": 22}]}]})
        )),
        name().prop_map(|s| ("Dpu", json!({"serial": s}))),
    ];
    (spec, name(), prop::collection::btree_map("[a-z]{1,5}", "[a-z0-9]{0,5}", 0..3))
        .prop_map(|((kind, spec), name, labels)| {
            let mut meta = json!({"name": name, "labels": labels});
            if matches!(kind, "Netdev" | "FlowPolicy") {
                meta["namespace"] = json!("default");
            }
            json!({"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec})
        })
        .boxed()
}

fn yaml_stream(docs: &[Value], as_json: &[bool]) -> String {
    docs.iter()
        .zip(as_json.iter().cycle())
        .map(|(d, j)| if *j { serde_json::to_string(d).unwrap() + "\n" } else { serde_yaml_ng::to_string(d).unwrap() })
        .map(|d| format!("---\n{d}"))
        .collect()
}

/// One way to break a valid document, and what the error must mention.
#[derive(Clone, Debug)]
enum Break {
    ApiVersion(String),
    Kind(String),
    NoName,
    NameNotString(Value),
    LabelsNotMap(Value),
    LabelNotString(Value),
    NoSpec,
    UnknownSpecField(String),
    WrongSpecType(Value),
    NotAnObject(Value),
}

fn breakage() -> impl Strategy<Value = Break> {
    let not_string = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(json!([1, 2])),
        Just(json!({"a": "b"})),
    ];
    prop_oneof![
        // Printable: a control character is the scanner's error, which libyaml's look-ahead may
        // charge to the document before (see the suite's report).
        "[^\\p{Cc}\\x{FFFE}\\x{FFFF}]{0,20}".prop_filter("wrong", |s| s != API_VERSION).prop_map(Break::ApiVersion),
        "[^\\p{Cc}\\x{FFFE}\\x{FFFF}]{0,20}"
            .prop_filter("unknown", |s| Kind::parse_stored(s).is_none() && s != "List")
            .prop_map(Break::Kind),
        Just(Break::NoName),
        not_string.clone().prop_map(Break::NameNotString),
        prop_oneof![Just(json!("a=b")), Just(json!(["a"])), any::<i64>().prop_map(Value::from)]
            .prop_map(Break::LabelsNotMap),
        not_string.clone().prop_filter("not null", |v| !v.is_null()).prop_map(Break::LabelNotString),
        Just(Break::NoSpec),
        "[a-z]{3,10}Bogus".prop_map(Break::UnknownSpecField),
        prop_oneof![Just(json!("text")), Just(json!(42)), Just(json!([1])), Just(json!(true))]
            .prop_map(Break::WrongSpecType),
        prop_oneof![Just(json!("text")), Just(json!(42)), Just(json!([1, 2])), Just(json!(true))]
            .prop_map(Break::NotAnObject),
    ]
}

/// Applies the breakage; returns the words the error must contain.
fn apply(doc: &mut Value, brk: &Break) -> Vec<String> {
    match brk {
        Break::ApiVersion(v) => {
            doc["apiVersion"] = json!(v);
            vec!["apiVersion".into()]
        }
        Break::Kind(k) => {
            doc["kind"] = json!(k);
            vec!["unknown kind".into()]
        }
        Break::NoName => {
            doc["metadata"].as_object_mut().unwrap().remove("name");
            vec!["metadata.name".into()]
        }
        Break::NameNotString(v) => {
            doc["metadata"]["name"] = v.clone();
            vec!["metadata.name".into()]
        }
        Break::LabelsNotMap(v) => {
            doc["metadata"]["labels"] = v.clone();
            vec!["metadata.labels".into()]
        }
        Break::LabelNotString(v) => {
            doc["metadata"]["labels"]["bad"] = v.clone();
            vec!["metadata.labels[\"bad\"]".into()]
        }
        Break::NoSpec => {
            doc.as_object_mut().unwrap().remove("spec");
            vec!["spec".into()]
        }
        Break::UnknownSpecField(f) => {
            doc["spec"][f.as_str()] = json!(1);
            vec!["spec".into(), f.clone()]
        }
        Break::WrongSpecType(v) => {
            doc["spec"] = v.clone();
            vec!["spec".into()]
        }
        Break::NotAnObject(v) => {
            *doc = v.clone();
            vec!["is not an object".into()]
        }
    }
}

/// Arbitrary JSON values, nested a little.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// Places a new YAML document may start (`---`, or content after `...`).
fn separators(text: &str) -> usize {
    text.matches("---").count() + text.matches("...").count()
}

/// Whether a refusal names a document the text can have: one per separator, plus the one
/// libyaml opens implicitly after a complete node when more text follows (`&a]` is a null
/// document, then a second that lacks its `<document start>`).
fn names_a_document(e: &manifest::ManifestError, text: &str) -> bool {
    let implicit = usize::from(e.message.contains("expected <document start>"));
    e.doc >= 1 && e.doc <= separators(text) + 1 + implicit
}

fn kind() -> impl Strategy<Value = Kind> {
    prop::sample::select(Kind::ALL.to_vec())
}

// ---- deep and large documents ----

fn deep(open: &str, close: &str, depth: usize) -> String {
    format!("{}{}", open.repeat(depth), close.repeat(depth))
}

/// Nesting far beyond the parser's recursion budget is refused by a depth limit (128), never
/// by the stack (test threads have 2 MiB), and flow nesting before the YAML scanner sees it
/// (its work grows with the square of the flow depth: 100,000 levels took minutes).
#[test]
fn deep_nesting_is_refused_by_the_depth_limit() {
    let depth = 1_000_000;
    let docs = [
        format!("apiVersion: {API_VERSION}\nkind: Vrf\nmetadata: {{name: a}}\nspec: {}\n", deep("[", "]", depth)),
        format!("apiVersion: {API_VERSION}\nkind: Vrf\nmetadata: {{name: a}}\nspec: {}\n", deep("{a: ", "}", 3000)),
        format!("{{\"apiVersion\": \"{API_VERSION}\", \"kind\": \"Vrf\", \"spec\": {}}}", deep("[", "]", depth)),
        // Block style: one more indentation per level.
        (0..1000).map(|i| format!("{}- \n", "  ".repeat(i))).collect::<String>(),
        deep("[", "]", depth),
    ];
    for (i, text) in docs.iter().enumerate() {
        let err = manifest::parse(text).unwrap_err();
        assert_eq!(err.doc, 1, "{i}: {err}");
        assert!(err.message.contains("recursion limit exceeded"), "{i}: {err}");
    }
    // The flow-depth check skips quoted scalars and comments, and counts documents.
    let quoted = format!(
        "apiVersion: {API_VERSION}\nkind: Vrf\nmetadata: {{name: \"{0}\"}}\n# {0}\nspec: {{a: '{0}'}}\n",
        "[".repeat(1000)
    );
    let err = manifest::parse(&quoted).unwrap_err();
    assert!(!err.message.contains("recursion limit"), "{err}");
    let second = format!("kind: List\n---\nspec: {}\n", deep("[", "]", 200));
    let err = manifest::parse(&second).unwrap_err();
    assert_eq!(err.doc, 2, "{err}");
    assert!(err.message.contains("recursion limit exceeded"), "{err}");
    // The depth limit sits well above any real manifest.
    let nested = deep("[", "]", 100);
    let text =
        format!("apiVersion: {API_VERSION}\nkind: Vrf\nmetadata: {{name: a}}\nspec: {{loopbackIpPrefix: {nested}}}\n");
    let err = manifest::parse(&text).unwrap_err();
    assert!(!err.message.contains("recursion limit"), "{err}");
    assert!(err.message.contains("spec"), "{err}");
}

/// Aliases that would expand exponentially ("billion laughs") are refused, quickly.
#[test]
fn alias_bombs_are_refused() {
    let mut text = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    let mut prev = 'a';
    for c in 'b'..='j' {
        text.push_str(&format!(
            "{c}: &{c} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
        ));
        prev = c;
    }
    let started = std::time::Instant::now();
    let err = manifest::parse(&text).unwrap_err();
    assert!(err.message.contains("repetition limit exceeded"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    // An alias of an alias is fine when small, and refused as a spec when of the wrong shape.
    let err = manifest::parse(&format!(
        "x: &x {{vlanId: 1}}\n---\napiVersion: {API_VERSION}\nkind: LogicalBridge\nmetadata: {{name: a}}\nspec: *x\n"
    ))
    .unwrap_err();
    assert_eq!(err.doc, 1, "the first document has no apiVersion: {err}");
}

/// Large scalars and many documents parse in bounded time; the size caps are the broker's.
#[test]
fn large_documents_parse_or_are_refused() {
    let big = "x".repeat(8 << 20);
    let text =
        format!("apiVersion: {API_VERSION}\nkind: Vrf\nmetadata: {{name: a}}\nspec: {{loopbackIpPrefix: {big}}}\n");
    let res = manifest::parse(&text).unwrap();
    assert_eq!(res.len(), 1);
    let many: String = (0..5000)
        .map(|i| {
            format!(
                "---\napiVersion: {API_VERSION}\nkind: LogicalBridge\nmetadata: {{name: lb-{i}}}\nspec: {{vlanId: 1}}\n"
            )
        })
        .collect();
    assert_eq!(manifest::parse(&many).unwrap().len(), 5000);
    let err = manifest::parse(&format!("{many}---\nkind: Nope\n")).unwrap_err();
    assert_eq!(err.doc, 5001, "{err}");
}

proptest! {
    #![proptest_config(cases(1))]

    /// Arbitrary text: parsed or refused naming a document that exists; never a panic.
    #[test]
    fn arbitrary_text_never_panics(text in prop_oneof![".{0,200}", "[-:{}\\[\\]&*!|>'\"#%@`, \\n\\ta-z0-9]{0,200}"]) {
        match manifest::parse(&text) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(names_a_document(&e, &text), "{} of {:?}", e, text);
                prop_assert!(!e.message.is_empty());
                let prefix = format!("document {}: ", e.doc);
                prop_assert!(e.to_string().starts_with(&prefix), "{e}");
            }
        }
    }

    /// Valid documents (YAML, JSON, or mixed) parse, and a parsed resource written back as a
    /// manifest parses to the same resource.
    #[test]
    fn valid_documents_round_trip(docs in prop::collection::vec(valid_doc(), 1..5), as_json in prop::collection::vec(any::<bool>(), 1..3), list in any::<bool>()) {
        let text = if list {
            serde_yaml_ng::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": docs})).unwrap()
        } else {
            yaml_stream(&docs, &as_json)
        };
        let res = manifest::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(res.len(), docs.len());
        let again: Vec<Value> = res.iter().map(manifest::to_manifest).collect();
        let reparsed = manifest::parse(&yaml_stream(&again, &[false])).unwrap();
        prop_assert_eq!(reparsed, res);
    }

    /// One broken document among valid ones: the error names its number (or its `items[j]`
    /// in a List) and the field.
    #[test]
    fn a_broken_document_is_named(
        docs in prop::collection::vec(valid_doc(), 1..5),
        at in any::<prop::sample::Index>(),
        brk in breakage(),
        list in any::<bool>(),
    ) {
        let mut docs = docs;
        let i = at.index(docs.len());
        let words = apply(&mut docs[i], &brk);
        let (text, doc_no, prefix) = if list {
            (serde_yaml_ng::to_string(&json!({"kind": "List", "items": docs})).unwrap(), 1, format!("items[{i}]: "))
        } else {
            (yaml_stream(&docs, &[false, true]), i + 1, String::new())
        };
        let err = manifest::parse(&text).unwrap_err();
        prop_assert_eq!(err.doc, doc_no, "{} in\n{}", err, text);
        prop_assert!(err.message.starts_with(&prefix), "{err}");
        for w in &words {
            prop_assert!(err.message.contains(w.as_str()), "{:?} does not mention {:?}", err.message, w);
        }
    }

    /// Valid text with bytes cut, doubled or replaced: parsed or refused, never a panic, and a
    /// refusal names an existing document.
    #[test]
    fn mutated_text_never_panics(
        docs in prop::collection::vec(valid_doc(), 1..4),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, prop::sample::select(vec!["", ":", "-", "[", "{", "&a", "*a", "\n", "  ", "!!binary", "---", "\"", "'", "\\u0000", "é", "\0"])), 1..6),
    ) {
        let mut text: Vec<char> = yaml_stream(&docs, &[false, true]).chars().collect();
        for (at, op, s) in edits {
            if text.is_empty() { break; }
            let i = at.index(text.len());
            match op {
                0 => { text.remove(i); }
                1 => { let c = text[i]; text.insert(i, c); }
                2 => { text.splice(i..i, s.chars()); }
                _ => { text.truncate(i); }
            }
        }
        let text: String = text.into_iter().collect();
        if let Err(e) = manifest::parse(&text) {
            prop_assert!(names_a_document(&e, &text), "{} of\n{}", e, text);
        }
    }

    /// The CRD spec decoder: arbitrary JSON as the spec of any kind decodes or is refused as
    /// `InvalidArgument` naming the place it was given.
    #[test]
    fn specs_decode_or_name_the_field(kind in kind(), spec in any_json()) {
        match Spec::from_json(kind, spec, "items[3].spec") {
            Ok(s) => prop_assert_eq!(s.kind(), kind),
            Err(Error::InvalidArgument { field, reason }) => {
                prop_assert_eq!(field, "items[3].spec");
                prop_assert!(!reason.is_empty());
            }
            Err(other) => prop_assert!(false, "{other:?}"),
        }
    }
}
