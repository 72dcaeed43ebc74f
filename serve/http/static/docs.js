// The /docs page: this server's /openapi.json drawn as plain HTML (operations, request fields with
// their constraints, responses, schemas). Replaces FastAPI's Swagger UI, which loads from a CDN.
import { ApiError, api, el, errorOf, setupKeyBox } from "/ui/common.js";
import {
  component, constraints, mentionedRefs, nestedRefs, operations, parseDocument, typeTokens,
} from "/ui/openapi.js";

const $ = (id) => document.getElementById(id);
const NESTING = 6; // deep enough for every request of ours; a schema that refers to itself stops here
let keyBox;

// Text with `code` spans (the document's descriptions use Markdown backticks), as DOM nodes.
function rich(text) {
  return String(text || "").split("`").map((part, i) => (i % 2 ? el("code", { text: part }) : part));
}

const anchor = (name) => `schema-${name}`;
const opId = (method, path) => `op-${method}-${path.replace(/[^A-Za-z0-9]+/g, "-").replace(/^-|-$/g, "")}`;

function typeNode(schema) {
  return el("code", { class: "type" }, ...typeTokens(schema).map((t) =>
    t.ref ? el("a", { href: `#${anchor(t.ref)}`, text: t.ref }) : t.text));
}

// One row per property: name (and whether it is required), type, constraints, description, and the
// fields of any object it holds, folded under the row.
function fieldsTable(doc, schema, trail) {
  const props = Object.entries(schema.properties || {});
  if (!props.length) {
    return el("p", { class: "hint", text: schema.additionalProperties === false ? "No fields." : "Any JSON object." });
  }
  const required = new Set(schema.required || []);
  const body = el("tbody");
  for (const [name, prop] of props) {
    body.append(el("tr", { dataset: { field: name } },
      el("td", { class: "name" }, el("code", { text: name }),
        required.has(name) ? el("span", { class: "req", text: "required" }) : null),
      el("td", {}, typeNode(prop)),
      el("td", { class: "rules" }, ...constraints(prop).map((r) => el("span", { class: "rule", text: r }))),
      el("td", { class: "desc" }, ...rich(prop.description))));
    // An object inside the field (messages[] is a ChatMessage): its fields, folded, on a full-width row.
    for (const { label, ref } of nestedRefs(name, prop)) {
      const sub = component(doc, ref);
      if (!sub || !sub.properties || trail.includes(ref) || trail.length >= NESTING) continue;
      const names = Object.keys(sub.properties).map((n) => ((sub.required || []).includes(n) ? `${n}*` : n));
      body.append(el("tr", { class: "nested-row", dataset: { nestedOf: name } }, el("td", { colspan: "4" },
        el("details", { class: "nested", dataset: { schema: ref } },
          el("summary", {}, el("code", { text: label }), ` is ${ref}: ${names.join(", ")}`),
          ...schemaBlock(doc, sub, [...trail, ref])))));
    }
  }
  return el("table", { class: "fields" },
    el("thead", {}, el("tr", {}, ...["Field", "Type", "Constraints", "Description"].map((h) => el("th", { text: h })))),
    body);
}

// A schema's description and fields (an object), or its type and constraints (anything else).
function schemaBlock(doc, schema, trail) {
  const out = [];
  if (schema.description) out.push(el("p", { class: "hint" }, ...rich(schema.description)));
  if (schema.properties || schema.type === "object") out.push(fieldsTable(doc, schema, trail));
  else out.push(el("p", {}, typeNode(schema), " ", constraints(schema).join("; ")));
  return out;
}

function requestBody(doc, body) {
  const section = el("div", { class: "request-body" }, el("h4", { text: "Request body" }));
  if (!body) {
    section.append(el("p", { class: "hint", text: "None." }));
    return section;
  }
  for (const [media, { schema = {} }] of Object.entries(body.content || {})) {
    const alts = schema.anyOf || schema.oneOf;
    const shapes = alts ? alts : [schema];
    section.append(el("p", { class: "media" }, el("code", { text: media }),
      alts ? `: one of ${shapes.length} shapes` : "", body.required ? " (required)" : ""));
    for (const shape of shapes) {
      const name = shape.$ref ? typeTokens(shape)[0].ref : null;
      const resolved = name ? component(doc, name) || {} : shape;
      if (name) section.append(el("h5", {}, el("a", { href: `#${anchor(name)}`, text: name })));
      section.append(...schemaBlock(doc, resolved, name ? [name] : []));
    }
  }
  return section;
}

function parameters(op) {
  if (!op.parameters || !op.parameters.length) return null;
  return el("div", {}, el("h4", { text: "Parameters" }), el("table", { class: "fields" }, el("tbody", {},
    ...op.parameters.map((p) => el("tr", { dataset: { field: p.name } },
      el("td", { class: "name" }, el("code", { text: p.name }), ` (${p.in})`,
        p.required ? el("span", { class: "req", text: "required" }) : null),
      el("td", {}, typeNode(p.schema || {})),
      el("td", { class: "rules" }, ...constraints(p.schema || {}).map((r) => el("span", { class: "rule", text: r }))),
      el("td", { class: "desc" }, ...rich(p.description)))))));
}

function responses(op) {
  const body = el("tbody");
  for (const [status, r] of Object.entries(op.responses || {})) {
    const content = el("td", { class: "content" });
    for (const [media, { schema = {} }] of Object.entries(r.content || {})) {
      const direct = typeTokens(schema).some((t) => t.ref);
      const deeper = direct ? [] : mentionedRefs(schema);
      content.append(el("div", {}, el("code", { text: media }), " ", typeNode(schema),
        deeper.length ? " of " : null,
        ...deeper.flatMap((n, i) => [i ? ", " : null, el("a", { href: `#${anchor(n)}`, text: n })]),
        schema.description ? el("span", { class: "hint" }, " — ", ...rich(schema.description)) : null));
    }
    for (const [name, h] of Object.entries(r.headers || {})) {
      content.append(el("div", {}, "header ", el("code", { text: name }), ": ", ...rich(h.description)));
    }
    body.append(el("tr", { dataset: { status } }, el("td", { class: "status-code", text: status }),
      el("td", { class: "desc" }, ...rich(r.description)), content));
  }
  return el("div", {}, el("h4", { text: "Responses" }), el("table", { class: "responses" },
    el("thead", {}, el("tr", {}, ...["Status", "Description", "Body"].map((h) => el("th", { text: h })))), body));
}

function operationCard(doc, { path, method, op }) {
  return el("section", { class: "card op", id: opId(method, path), dataset: { method, path } },
    el("h3", {}, el("span", { class: `method ${method}`, text: method.toUpperCase() }), " ",
      el("code", { class: "path", text: path })),
    op.summary ? el("p", { class: "summary" }, ...rich(op.summary)) : null,
    op.description ? el("p", { class: "hint" }, ...rich(op.description)) : null,
    parameters(op), requestBody(doc, op.requestBody), responses(op));
}

function schemaCard(doc, name, schema) {
  return el("section", { class: "card schema", id: anchor(name), dataset: { schema: name } },
    el("h3", {}, el("code", { text: name })), ...schemaBlock(doc, schema, [name]));
}

function render(doc) {
  const info = doc.info || {};
  $("api-title").textContent = `${info.title || "API"} ${info.version || ""}`.trim();
  $("api-desc").replaceChildren(...rich(info.description));
  const ops = operations(doc);
  $("toc").replaceChildren(...ops.map(({ path, method, op }) => el("li", {},
    el("a", { href: `#${opId(method, path)}` }, el("span", { class: `method ${method}`, text: method.toUpperCase() }),
      " ", el("code", { text: path })), op.summary ? el("span", { class: "hint", text: ` ${op.summary}` }) : null)));
  $("operations").replaceChildren(...ops.map((o) => operationCard(doc, o)));
  const schemas = Object.entries((doc.components || {}).schemas || {});
  $("schemas").replaceChildren(el("h2", { text: "Schemas" }), ...schemas.map(([n, s]) => schemaCard(doc, n, s)));
  $("operations").dataset.loaded = String(ops.length);
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}

async function load() {
  const status = $("docs-status");
  status.classList.remove("error");
  if (!keyBox.ready()) {
    status.textContent = "Enter this server's API key: its API description (/openapi.json) needs it.";
    return;
  }
  status.textContent = "loading /openapi.json…";
  try {
    const res = await api("/openapi.json");
    if (!res.ok) throw await errorOf(res);
    render(parseDocument(await res.text()));
    status.textContent = "";
    status.hidden = true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) keyBox.refused();
    status.hidden = false;
    status.textContent = `could not read /openapi.json: ${err.message}`;
    status.classList.add("error");
  }
}

async function main() {
  keyBox = await setupKeyBox({ onChange: load });
  await load();
  document.body.dataset.ready = "1";
}

main();
