// Node module-customization hook that lets Node load @influxdata/flux-lsp-browser.
//
// The package is a wasm-bindgen "bundler" build: flux-lsp-browser_bg.js starts with
// `import * as wasm from './flux-lsp-browser_bg.wasm'` (an ESM WebAssembly import that Node
// does not support without flags), and its package.json has no "type": "module", so Node
// would also load the .js files as CommonJS. This hook, for that package only:
//   - loads its .js files as ES modules;
//   - turns its .wasm file into a small ES module that compiles and instantiates the wasm with
//     the JS glue module (`./flux-lsp-browser_bg.js`) as its import object and re-exports every
//     wasm export by name, which is exactly what the glue module's `wasm.*` references need.
// Import `flux-lsp-browser_bg.js` (not `flux-lsp-browser.js`) as the entry point: then the
// wasm module, the glue's dependency, finishes evaluating before the glue's top-level code
// reads `wasm.memory`.
import { readFile } from "node:fs/promises";

const PACKAGE_DIR = "/node_modules/@influxdata/flux-lsp-browser/";

export async function load(url, context, nextLoad) {
  if (!url.startsWith("file:") || !url.includes(PACKAGE_DIR)) {
    return nextLoad(url, context);
  }
  if (url.endsWith(".js")) {
    const source = await readFile(new URL(url), "utf8");
    return { format: "module", source, shortCircuit: true };
  }
  if (url.endsWith(".wasm")) {
    // Compiled here only to list import modules and export names (V8 compiles lazily, so
    // this is cheap); the generated module compiles the bytes again in the main thread.
    const compiled = new WebAssembly.Module(await readFile(new URL(url)));
    const importModules = [...new Set(WebAssembly.Module.imports(compiled).map((i) => i.module))];
    const exportNames = WebAssembly.Module.exports(compiled).map((e) => e.name);
    const lines = ['import { readFileSync } from "node:fs";'];
    importModules.forEach((name, i) => lines.push(`import * as imports${i} from ${JSON.stringify(name)};`));
    const importObject = importModules.map((name, i) => `${JSON.stringify(name)}: imports${i}`);
    lines.push(
      "const instance = new WebAssembly.Instance(",
      "  new WebAssembly.Module(readFileSync(new URL(import.meta.url))),",
      `  {${importObject.join(", ")}},`,
      ");",
    );
    exportNames.forEach((name, i) => {
      lines.push(`const export${i} = instance.exports[${JSON.stringify(name)}];`);
      lines.push(`export { export${i} as ${JSON.stringify(name)} };`);
    });
    return { format: "module", source: lines.join("\n"), shortCircuit: true };
  }
  return nextLoad(url, context);
}
