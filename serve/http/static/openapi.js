// Reading an OpenAPI 3.1 document for the /docs page: types, constraints and nested objects as text.
// No DOM here (docs.js draws); every function takes a plain schema object from /openapi.json.

const REF_PREFIX = "#/components/schemas/";

// JSON numbers past 2^53 (a seed's uint64 bound) lose digits in a JS number; the reviver keeps the
// document's own digits (as a BigInt) where the browser exposes the source text (Chromium 114+).
function exactIntegers(_key, value, context) {
  if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
    return BigInt(context.source);
  }
  return value;
}

export function parseDocument(text) {
  return JSON.parse(text, exactIntegers);
}

// A value as the schema states it: strings quoted, numbers (BigInt too) as written.
export function show(v) {
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "string") return JSON.stringify(v);
  if (v !== null && typeof v === "object") return JSON.stringify(v, (_k, x) => (typeof x === "bigint" ? x.toString() : x));
  return String(v);
}

export function refName(ref) {
  return ref.startsWith(REF_PREFIX) ? ref.slice(REF_PREFIX.length) : ref;
}

export function component(doc, name) {
  return ((doc.components || {}).schemas || {})[name];
}

// A schema's alternatives (anyOf / oneOf), or the schema itself.
export function alternatives(s) {
  return s.anyOf || s.oneOf || [s];
}

const isNull = (s) => s.type === "null";

// The type as tokens: {text} pieces and {ref} names the page links to their schema.
export function typeTokens(s) {
  if (!s || typeof s !== "object" || Object.keys(s).length === 0) return [{ text: "any" }];
  if (s.$ref) return [{ ref: refName(s.$ref) }];
  if (s.anyOf || s.oneOf) {
    const out = [];
    for (const [i, alt] of alternatives(s).entries()) {
      if (i) out.push({ text: " | " });
      out.push(...typeTokens(alt));
    }
    return out;
  }
  if ("const" in s) return [{ text: show(s.const) }];
  const type = Array.isArray(s.type) ? s.type.join(" | ") : s.type;
  if (type === "array") {
    const inner = typeTokens(s.items || {});
    const union = inner.some((t) => t.text === " | ");
    return [{ text: "array of " }, ...(union ? [{ text: "(" }, ...inner, { text: ")" }] : inner)];
  }
  if (type === "object" && s.patternProperties) {
    const [pattern, value] = Object.entries(s.patternProperties)[0];
    return [{ text: `object (keys ${pattern}) of ` }, ...typeTokens(value)];
  }
  if (s.enum && !type) return [{ text: "enum" }];
  return [{ text: type || "any" }];
}

export function typeText(s) {
  return typeTokens(s).map((t) => t.text ?? t.ref).join("");
}

// The rules a value must follow, stated on one schema node (not its alternatives).
const RULES = [
  ["enum", (v) => `one of ${v.map(show).join(", ")}`],
  ["minimum", (v) => `≥ ${show(v)}`],
  ["exclusiveMinimum", (v) => `> ${show(v)}`],
  ["maximum", (v) => `≤ ${show(v)}`],
  ["exclusiveMaximum", (v) => `< ${show(v)}`],
  ["multipleOf", (v) => `multiple of ${show(v)}`],
  ["minLength", (v) => `length ≥ ${show(v)}`],
  ["maxLength", (v) => `length ≤ ${show(v)}`],
  ["pattern", (v) => `matches ${v}`],
  ["format", (v) => `format ${v}`],
  ["minItems", (v) => `≥ ${show(v)} items`],
  ["maxItems", (v) => `≤ ${show(v)} items`],
  ["uniqueItems", (v) => (v ? "items unique" : null)],
  ["minProperties", (v) => `≥ ${show(v)} keys`],
  ["maxProperties", (v) => `≤ ${show(v)} keys`],
];

export function nodeRules(s) {
  const out = [];
  for (const [key, say] of RULES) {
    if (key in s) {
      const text = say(s[key]);
      if (text) out.push(text);
    }
  }
  if (s.items && !s.items.$ref) {
    const inner = nodeRules(s.items);
    if (inner.length) out.push(`each item ${inner.join(", ")}`);
  }
  if (s.patternProperties) {
    for (const value of Object.values(s.patternProperties)) {
      const inner = nodeRules(value);
      if (inner.length) out.push(`each value ${inner.join(", ")}`);
    }
  }
  return out;
}

// A field's constraints, one line per alternative that has any ("integer: ≥ 1, ≤ 255"); a field with
// a single non-null alternative needs no type prefix. A null default is left out: it means "absent".
export function constraints(s) {
  const alts = alternatives(s).filter((a) => !isNull(a));
  const lines = [];
  const own = s.anyOf || s.oneOf ? nodeRules(s) : [];
  if (own.length) lines.push(own.join(", "));
  for (const alt of alts) {
    const rules = nodeRules(alt);
    if (!rules.length) continue;
    lines.push(alts.length > 1 ? `${typeText(alt)}: ${rules.join(", ")}` : rules.join(", "));
  }
  if ("default" in s && s.default !== null) lines.push(`default ${show(s.default)}`);
  return lines;
}

// The object schemas a field holds directly (through alternatives and array items), each with the
// name the field's value takes there: "messages[]" for the items of messages.
export function nestedRefs(name, s) {
  const out = [];
  const walk = (node, label) => {
    if (!node || typeof node !== "object") return;
    if (node.$ref) out.push({ label, ref: refName(node.$ref) });
    for (const alt of node.anyOf || node.oneOf || []) walk(alt, label);
    if (node.items) walk(node.items, `${label}[]`);
  };
  walk(s, name);
  return out.filter((r, i) => out.findIndex((o) => o.ref === r.ref && o.label === r.label) === i);
}

// Every schema name a (response) schema mentions anywhere, e.g. inside an event stream's contentSchema.
export function mentionedRefs(s) {
  const names = new Set();
  const walk = (node) => {
    if (Array.isArray(node)) node.forEach(walk);
    else if (node && typeof node === "object") {
      if (typeof node.$ref === "string") names.add(refName(node.$ref));
      Object.values(node).forEach(walk);
    }
  };
  walk(s);
  return [...names];
}

// The operations in document order: [{path, method, op}].
const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

export function operations(doc) {
  const out = [];
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) if (item[method]) out.push({ path, method, op: item[method] });
  }
  return out;
}
