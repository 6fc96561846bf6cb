//! Every launcher's argument list against the `extern "C"` signature of its kernel in the
//! `.cu` source: names, order and types. A mismatch would reach a GPU as misread bytes, which
//! no CPU test of the kernels themselves can see.

use std::collections::HashMap;

use super::{Kernel, Param, Source};
use crate::kernels::SOURCES;

/// The shared header every source is compiled with (its `#define`s are in scope).
const COMMON: &str = include_str!("../../kernels/common.cuh");

/// `extern "C"` kernels of one source: name → `(parameter name, type)` list.
fn declared(source: &str) -> HashMap<String, Vec<(String, Param)>> {
    let text = format!("{COMMON}\n{source}").replace("\\\n", " ");
    let text = expand_function_macros(&text);
    let defines = object_defines(&text);
    let mut out = HashMap::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("extern \"C\" __global__ void ") {
        rest = &rest[at + "extern \"C\" __global__ void ".len()..];
        let mut head = rest.trim_start();
        if let Some(bounds) = head.strip_prefix("__launch_bounds__(") {
            let close = bounds.find(')').expect("__launch_bounds__ closes");
            head = bounds[close + 1..].trim_start();
        }
        let open = head.find('(').expect("a kernel has a parameter list");
        let name = head[..open].trim().to_string();
        let close = head[open..].find(')').expect("a parameter list closes") + open;
        let mut params = head[open + 1..close].to_string();
        for (macro_name, body) in &defines {
            params = replace_word(&params, macro_name, body);
        }
        let list = params.split(',').map(|p| parse_param(&name, p)).collect();
        out.insert(name, list);
    }
    out
}

/// `(name, type)` of one C parameter such as `const store_t* x` or `i64 n`.
fn parse_param(kernel: &str, p: &str) -> (String, Param) {
    let p = p.split_whitespace().collect::<Vec<_>>().join(" ");
    let split = p
        .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or_else(|| panic!("{kernel}: parameter `{p}` has no type"));
    let (ty, name) = (p[..=split].trim(), p[split + 1..].to_string());
    let param = if ty.contains('*') {
        Param::Ptr
    } else {
        match ty.trim_start_matches("const ").trim() {
            "i64" => Param::I64,
            "int" => Param::I32,
            "unsigned" => Param::U32,
            "float" => Param::F32,
            "double" => Param::F64,
            "Shape" => Param::Shape,
            other => {
                panic!("{kernel}: parameter `{name}` has a type this test does not know: `{other}`")
            }
        }
    };
    (name, param)
}

/// Object-like `#define NAME body` (no parameters).
fn object_defines(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("#define "))
        .filter_map(|l| {
            let end = l.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
            l[end..]
                .starts_with(' ')
                .then(|| (l[..end].to_string(), l[end..].trim().to_string()))
        })
        .collect()
}

/// Expands the one-parameter macros that define kernels (`#define LINEAR_FEW_ROWS(M) …` then
/// `LINEAR_FEW_ROWS(4)` on a line of its own), token pasting included.
fn expand_function_macros(text: &str) -> String {
    let mut out = text.to_string();
    for line in text.lines() {
        let Some(def) = line.trim_start().strip_prefix("#define ") else {
            continue;
        };
        let Some(open) = def.find('(') else { continue };
        let name = &def[..open];
        if name.contains(' ') || !def.contains("extern \"C\"") {
            continue;
        }
        let close = def.find(')').expect("a macro's parameters close");
        let param = def[open + 1..close].trim();
        let body = &def[close + 1..];
        let call = format!("{name}(");
        for use_line in text.lines().filter(|l| l.starts_with(&call)) {
            let value = use_line[call.len()..].trim_end().trim_end_matches(')');
            let pasted = body
                .replace(&format!("##{param}##"), value)
                .replace(&format!("##{param}"), value);
            out.push('\n');
            out.push_str(&replace_word(&pasted, param, value));
        }
        out = out.replace(line, "");
    }
    out
}

/// `text` with every whole-word `word` replaced.
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if before.is_some_and(is_word) || after.is_some_and(is_word) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

fn all_declared() -> HashMap<Source, HashMap<String, Vec<(String, Param)>>> {
    Source::ALL
        .iter()
        .map(|&s| (s, declared(s.text())))
        .collect()
}

#[test]
fn every_launcher_passes_what_its_kernel_declares() {
    let sources = all_declared();
    for &kernel in Kernel::ALL {
        let file = kernel.source().file();
        let Some(declared) = sources[&kernel.source()].get(kernel.name()) else {
            panic!(
                "{kernel:?}: {file} defines no extern \"C\" kernel `{}`",
                kernel.name()
            );
        };
        let passed: Vec<(String, Param)> = kernel
            .params()
            .into_iter()
            .map(|(n, p)| (n.to_string(), p))
            .collect();
        assert!(
            passed.len() <= crate::launch::MAX_ARGS,
            "{kernel:?}: raise MAX_ARGS"
        );
        assert_eq!(
            &passed,
            declared,
            "{kernel:?}: the launcher's arguments (left) are not `{}`'s in {file} (right)",
            kernel.name()
        );
    }
}

#[test]
fn every_kernel_in_the_sources_has_a_launcher() {
    for (source, kernels) in all_declared() {
        for name in kernels.keys() {
            assert!(
                Kernel::ALL
                    .iter()
                    .any(|k| k.source() == source && k.name() == name),
                "{} defines `{name}`, which no launcher names (kernel.rs)",
                source.file()
            );
        }
    }
}

#[test]
fn the_parser_reads_pointers_macros_and_pasted_names() {
    let src = "#define ARGS float p, unsigned key\n\
               #define MANY(M) \\\n extern \"C\" __global__ void k_##M##_x(const store_t* a, int m) {}\n\
               MANY(2)\n\
               extern \"C\" __global__ void __launch_bounds__(128, 3) f(double* out, i64 n, ARGS) {}\n";
    let d = declared(src);
    assert_eq!(
        d["k_2_x"],
        vec![("a".into(), Param::Ptr), ("m".into(), Param::I32)]
    );
    assert_eq!(
        d["f"],
        vec![
            ("out".into(), Param::Ptr),
            ("n".into(), Param::I64),
            ("p".into(), Param::F32),
            ("key".into(), Param::U32)
        ]
    );
    assert_eq!(SOURCES.len(), Source::ALL.len());
}
