#!/usr/bin/env node
// Turns a JavaScript rule module into a Turnstile rule component with componentize-js (pinned in
// package.json): `node build.mjs RULE_DIR --out FILE`. RULE_DIR's package.json names the module
// (`main`, default `rule.js`); the WIT is RULE_DIR/wit, else the nearest ancestor's wit/rule.wit
// (this repository's). `turnstile build RULE_DIR` runs this through the rule's `npm run build`.
//
// WASI features: the JS engine always imports stdio, clocks and random (Turnstile's host makes them
// deterministic); `http` and `fetch-event` are disabled because a rule has no network.

import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const DISABLED_FEATURES = ["http", "fetch-event"];
const COMPONENTIZE_JS = "@bytecodealliance/componentize-js";

function usage(message) {
  console.error(`error: ${message}\nusage: node build.mjs RULE_DIR --out FILE [--wit DIR]`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { ruleDir: undefined, out: undefined, wit: undefined };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--out" || arg === "-o") args.out = argv[++i];
    else if (arg === "--wit") args.wit = argv[++i];
    else if (arg.startsWith("-")) usage(`unknown option ${arg}`);
    else if (args.ruleDir === undefined) args.ruleDir = arg;
    else usage(`unexpected argument ${arg}`);
  }
  if (args.ruleDir === undefined) usage("no RULE_DIR given");
  if (args.out === undefined) usage("no --out FILE given");
  return args;
}

/** The rule's WIT directory: its own `wit/`, else the nearest ancestor's `wit/rule.wit`. */
function findWit(ruleDir) {
  for (let dir = ruleDir; ; dir = dirname(dir)) {
    if (existsSync(join(dir, "wit", "rule.wit"))) return join(dir, "wit");
    if (dirname(dir) === dir) return undefined;
  }
}

const args = parseArgs(process.argv.slice(2));
const ruleDir = resolve(args.ruleDir);
const manifestPath = join(ruleDir, "package.json");
const manifest = existsSync(manifestPath) ? JSON.parse(readFileSync(manifestPath, "utf8")) : {};
const sourcePath = join(ruleDir, manifest.main ?? "rule.js");
if (!existsSync(sourcePath)) usage(`${sourcePath} does not exist (package.json "main" names the rule module)`);
const witPath = args.wit ? resolve(args.wit) : findWit(ruleDir);
if (witPath === undefined) usage(`no wit/rule.wit in ${ruleDir} or above it; pass --wit DIR`);

/** The package that pins componentize-js for this script: the nearest package.json above it. */
function pinningPackageDir() {
  const here = dirname(fileURLToPath(import.meta.url));
  for (let dir = here; ; dir = dirname(dir)) {
    const manifest = join(dir, "package.json");
    if (existsSync(manifest) && readFileSync(manifest, "utf8").includes(COMPONENTIZE_JS)) return dir;
    if (dirname(dir) === dir) return here;
  }
}

let componentize;
try {
  ({ componentize } = await import(COMPONENTIZE_JS));
} catch (e) {
  console.error(
    `error: ${COMPONENTIZE_JS} is not installed (${e.code ?? e.message}); run \`npm install\` in ${pinningPackageDir()}`,
  );
  process.exit(3);
}

const { component } = await componentize({
  sourcePath,
  witPath,
  worldName: "rule",
  disableFeatures: DISABLED_FEATURES,
});
const out = resolve(args.out);
mkdirSync(dirname(out), { recursive: true });
writeFileSync(out, component);
console.error(`built ${out} (${component.length} bytes) from ${sourcePath}`);
