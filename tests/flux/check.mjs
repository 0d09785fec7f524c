// Type-check Flux queries with the official Flux compiler front end (@influxdata/flux-lsp-browser,
// the Flux parser and semantic analyser compiled to WASM), many queries per Node process.
//
// stdin:  JSON array of {name, source, preamble?}. The preamble declares what the query expects
//         to be defined at run time (influxdb-client's `params` record, Grafana's `v` record);
//         it is inserted after the query's own imports and does not count in line numbers.
// stdout: JSON array of {name, valid, errors, warnings}; each error is
//         "line L, column C: message" (1-based, in the query's own text) or "preamble line L: ...".
// Exit status 0 when every query was checked (valid or not), 2 on bad input or internal failure.
//
// Each query is checked three ways, all by the official front end:
//   1. `new Flux(text).is_valid()` -- semantic check; a boolean only.
//   2. Language-server diagnostics (`Lsp`, `textDocument/didOpen` -> `publishDiagnostics`) on the
//      same text -- the same analysis with messages and positions (syntax errors, undefined
//      identifiers, unknown/missing arguments, type mismatches, bad imports).
//   3. `range()` declares `start: A, ?stop: B` with unconstrained types, so neither 1 nor 2
//      rejects `range(start: "yesterday")` (InfluxDB only fails it at run time). The text is
//      re-checked with every range start/stop argument wrapped in the stdlib's
//      `date.truncate(t: T, unit: 1ns) where T: Timeable`, whose Timeable constraint the
//      checker enforces: a time or a duration passes, anything else (string, bool, float) is
//      reported. Integer literals (Unix nanoseconds, e.g. `range(start: 0)`) are left alone;
//      an int-typed expression other than a literal is reported.
import * as nodeModule from "node:module";
import { readFileSync } from "node:fs";

const DIAGNOSTICS_TIMEOUT_MS = 10_000;
const WRAP_ALIAS = "_fluxcheck_date";
const WRAP_PREFIX = `${WRAP_ALIAS}.truncate(t: `;
const WRAP_SUFFIX = ", unit: 1ns)";

// The wasm logs through console.*; stdout must carry only the JSON result.
const toStderr = (...args) => process.stderr.write(args.map(String).join(" ") + "\n");
const debug = process.env.FLUXCHECK_DEBUG ? toStderr : () => {};
console.log = console.info = console.debug = debug;
console.warn = console.error = toStderr;

function fail(message) {
  process.stderr.write(`check.mjs: ${message}\n`);
  process.exit(2);
}

// A namespace import, so that an older Node reaches this message instead of a link error.
if (typeof nodeModule.register !== "function") {
  fail(`Node ${process.version} lacks module.register(); Node >= 18.19 or >= 20.6 is required`);
}
nodeModule.register("./wasm-loader.mjs", import.meta.url);
const { Flux, Lsp, parse } = await import("@influxdata/flux-lsp-browser/flux-lsp-browser_bg.js");

// --- text positions ---------------------------------------------------------------------------

/** Start index of every line of `text`. */
function lineStarts(text) {
  const starts = [0];
  for (let i = 0; i < text.length; i++) if (text[i] === "\n") starts.push(i + 1);
  return starts;
}

/** String index of a Flux AST position (1-based line, 1-based UTF-8 byte column). */
function astIndex(text, starts, pos) {
  const start = starts[pos.line - 1];
  const end = pos.line < starts.length ? starts[pos.line] : text.length;
  const bytes = Buffer.from(text.slice(start, end), "utf8");
  return start + bytes.subarray(0, pos.column - 1).toString("utf8").length;
}

/** 0-based {line, col} of a string index. */
function lineCol(starts, index) {
  let line = 0;
  while (line + 1 < starts.length && starts[line + 1] <= index) line++;
  return { line, col: index - starts[line] };
}

// --- preamble ---------------------------------------------------------------------------------

/**
 * Insert `preamble` after the query's package clause and imports (imports must precede
 * statements). Returns the combined text and a map from combined 0-based positions back to the
 * query's own positions.
 */
function assemble(source, preamble, ast) {
  const header = [ast.package, ...(ast.imports ?? [])].filter(Boolean);
  const starts = lineStarts(source);
  const at = header.length ? astIndex(source, starts, header[header.length - 1].location.end) : 0;
  const pre = preamble.replace(/\s+$/, "");
  const inserted = (at > 0 ? "\n" : "") + (pre ? pre + "\n" : "");
  const text = source.slice(0, at) + inserted + source.slice(at);
  const { line: hLine, col: hCol } = lineCol(starts, at);
  const n = (inserted.match(/\n/g) ?? []).length;
  const firstPreambleLine = hLine + (at > 0 ? 1 : 0);
  const map = (line, col) => {
    if (line < hLine || (line === hLine && col < hCol) || n === 0) return { where: "query", line, col };
    if (line < hLine + n) return { where: "preamble", line: line - firstPreambleLine, col };
    return { where: "query", line: line - n, col: line === hLine + n ? col + hCol : col };
  };
  return { text, map };
}

// --- range() argument wrapping ----------------------------------------------------------------

/** Every node of a Flux AST (plain JSON from `parse`). */
function* walk(node) {
  if (Array.isArray(node)) {
    for (const child of node) yield* walk(child);
  } else if (node && typeof node === "object") {
    yield node;
    for (const [key, child] of Object.entries(node)) if (key !== "location") yield* walk(child);
  }
}

/**
 * Source edits wrapping each `range(start:/stop:)` argument in a Timeable-constrained identity.
 * Returns [{key, from, to, edits: [{index, text}]}] in string indices of `source`.
 */
function rangeWraps(source, ast) {
  const starts = lineStarts(source);
  const wraps = [];
  for (const node of walk(ast)) {
    if (node.callee?.type !== "Identifier" || node.callee.name !== "range") continue;
    for (const prop of node.arguments?.[0]?.properties ?? []) {
      const key = prop.key?.name ?? prop.key?.value;
      if (key !== "start" && key !== "stop") continue;
      // An integer literal is a Unix timestamp in nanoseconds, which range() accepts.
      if (prop.value?.type === "IntegerLiteral") continue;
      if (prop.value) {
        const from = astIndex(source, starts, prop.value.location.start);
        const to = astIndex(source, starts, prop.value.location.end);
        wraps.push({ key, from, to, edits: [{ index: from, text: WRAP_PREFIX }, { index: to, text: WRAP_SUFFIX }] });
      } else {
        // Shorthand `range(start)` means `range(start: start)`.
        const to = astIndex(source, starts, prop.key.location.end);
        const from = astIndex(source, starts, prop.key.location.start);
        wraps.push({ key, from, to, edits: [{ index: to, text: `: ${WRAP_PREFIX}${key}${WRAP_SUFFIX}` }] });
      }
    }
  }
  return wraps;
}

/** Apply insertions (none contains a newline); return the text and a position un-mapper. */
function applyEdits(source, edits) {
  const sorted = [...edits].sort((a, b) => a.index - b.index);
  let text = "";
  let last = 0;
  for (const edit of sorted) {
    text += source.slice(last, edit.index) + edit.text;
    last = edit.index;
  }
  text += source.slice(last);
  const starts = lineStarts(source);
  const byLine = new Map();
  for (const edit of sorted) {
    const { line, col } = lineCol(starts, edit.index);
    if (!byLine.has(line)) byLine.set(line, []);
    byLine.get(line).push({ col, length: edit.text.length });
  }
  // Edited (line, col) -> original string index; a position inside inserted text maps to the
  // insertion point.
  const unmap = (line, col) => {
    let shift = 0;
    for (const edit of byLine.get(line) ?? []) {
      if (col < edit.col + shift) break;
      if (col < edit.col + shift + edit.length) return starts[line] + edit.col;
      shift += edit.length;
    }
    return starts[line] + col - shift;
  };
  return { text, unmap };
}

// --- the language server ----------------------------------------------------------------------

const lsp = new Lsp();
const waiting = new Map();
lsp.onMessage((message) => {
  const msg = JSON.parse(message);
  if (msg.method !== "textDocument/publishDiagnostics") return;
  const resolve = waiting.get(msg.params.uri);
  if (resolve) {
    waiting.delete(msg.params.uri);
    resolve(msg.params.diagnostics);
  }
});
lsp.run().then(
  () => debug("flux language server stopped"),
  (err) => toStderr(`flux language server failed: ${err}`),
);
const send = (msg) => lsp.send(JSON.stringify({ jsonrpc: "2.0", ...msg }));
await send({ id: 1, method: "initialize", params: { processId: process.pid, rootUri: null, capabilities: {} } });
await send({ method: "initialized", params: {} });

let documents = 0;

/** Language-server diagnostics for `text`. Each document gets its own directory: the server
 * treats the files of one directory as one package. */
async function diagnose(text) {
  const uri = `file:///fluxcheck/${++documents}/query.flux`;
  let timer;
  const diagnostics = new Promise((resolve, reject) => {
    waiting.set(uri, resolve);
    timer = setTimeout(
      () => reject(new Error(`no diagnostics from the Flux language server within ${DIAGNOSTICS_TIMEOUT_MS} ms`)),
      DIAGNOSTICS_TIMEOUT_MS,
    );
  });
  try {
    await send({ method: "textDocument/didOpen", params: { textDocument: { uri, languageId: "flux", version: 1, text } } });
    return await diagnostics;
  } finally {
    clearTimeout(timer);
    waiting.delete(uri);
    await send({ method: "textDocument/didClose", params: { textDocument: { uri } } });
  }
}

function isValid(text) {
  const flux = new Flux(text);
  try {
    return flux.is_valid();
  } finally {
    flux.free();
  }
}

// --- checking one query -----------------------------------------------------------------------

function describe(error) {
  return error.where === "preamble"
    ? `preamble line ${error.line + 1}: ${error.message}`
    : `line ${error.line + 1}, column ${error.col + 1}: ${error.message}`;
}

function byPosition(a, b) {
  return (a.where === "preamble" ? -1 : 0) - (b.where === "preamble" ? -1 : 0) || a.line - b.line || a.col - b.col;
}

const isError = (d) => d.severity === 1 || d.severity === undefined;

async function check({ name, source, preamble = "" }) {
  const ast = parse(source);
  const { text, map } = assemble(source, preamble, ast);
  const valid = isValid(text);
  const errors = [];
  const warnings = [];
  for (const d of await diagnose(text)) {
    const found = { ...map(d.range.start.line, d.range.start.character), message: d.message };
    if (isError(d)) errors.push(found);
    else if (found.where === "query") warnings.push(found); // e.g. "Avoid using `params`" on our preamble
  }
  if (!valid && errors.length === 0) {
    errors.push({ where: "query", line: 0, col: 0, message: "Flux.is_valid() is false but the language server reported no error" });
  }

  const wraps = rangeWraps(source, ast);
  if (wraps.length) {
    // Same text with range start/stop wrapped; the alias import goes after the query's imports.
    const { text: wrapped, unmap } = applyEdits(source, wraps.flatMap((w) => w.edits));
    const { text: wrappedText, map: wrappedMap } = assemble(wrapped, `import ${WRAP_ALIAS} "date"\n${preamble}`, parse(wrapped));
    const starts = lineStarts(source);
    const seen = new Set(errors.map(describe));
    for (const d of await diagnose(wrappedText)) {
      if (!isError(d) || !/is not Timeable/.test(d.message)) continue;
      const pos = wrappedMap(d.range.start.line, d.range.start.character);
      let found;
      if (pos.where === "query") {
        const index = unmap(pos.line, pos.col);
        const wrap = wraps.find((w) => w.from <= index && index <= w.to);
        found = wrap
          ? { where: "query", ...lineCol(starts, wrap.from), message: d.message.replace("(argument t)", `(argument ${wrap.key} of range)`) }
          : { where: "query", ...lineCol(starts, index), message: d.message };
      } else {
        found = { ...pos, message: d.message };
      }
      found.message += ": range() start and stop need a time or a duration";
      if (!seen.has(describe(found))) {
        seen.add(describe(found));
        errors.push(found);
      }
    }
  }
  return {
    name,
    valid: errors.length === 0,
    errors: errors.sort(byPosition).map(describe),
    warnings: warnings.sort(byPosition).map(describe),
  };
}

// --- main -------------------------------------------------------------------------------------

let queries;
try {
  queries = JSON.parse(readFileSync(0, "utf8"));
} catch (err) {
  fail(`stdin is not JSON: ${err.message}`);
}
if (!Array.isArray(queries) || !queries.every((q) => q && typeof q.name === "string" && typeof q.source === "string" && (q.preamble === undefined || typeof q.preamble === "string"))) {
  fail("stdin must be a JSON array of {name: string, source: string, preamble?: string}");
}
const results = [];
for (const query of queries) {
  try {
    results.push(await check(query));
  } catch (err) {
    fail(`checking ${JSON.stringify(query.name)}: ${err.stack ?? err}`);
  }
}
process.stdout.write(JSON.stringify(results) + "\n", () => process.exit(0));
