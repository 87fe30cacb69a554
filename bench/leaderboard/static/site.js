// Sorting and filtering for the leaderboard tables. The pages are complete without this script:
// tables are server-rendered in rank order; this only reorders or hides existing rows.
"use strict";

function cellKey(row, col) {
  const cell = row.cells[col];
  if (!cell) return { num: NaN, text: "" };
  const raw = cell.dataset.sort !== undefined ? cell.dataset.sort : cell.textContent.trim();
  return { num: raw === "" ? NaN : Number(raw), text: cell.textContent.trim().toLowerCase() };
}

function sortBy(table, col, th) {
  const body = table.tBodies[0];
  const rows = Array.from(body.rows);
  const ascending = th.getAttribute("aria-sort") !== "ascending";
  rows.sort((a, b) => {
    const x = cellKey(a, col), y = cellKey(b, col);
    let c;
    if (isNaN(x.num) || isNaN(y.num)) {
      // numbers before blanks, then text order
      if (!isNaN(x.num)) c = -1; else if (!isNaN(y.num)) c = 1; else c = x.text.localeCompare(y.text);
      return c;  // blanks stay last in both directions
    }
    c = x.num - y.num;
    return ascending ? c : -c;
  });
  for (const other of table.tHead.rows[0].cells) other.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  for (const r of rows) body.appendChild(r);
}

function makeSortable(table) {
  const head = table.tHead && table.tHead.rows[0];
  if (!head) return;
  Array.from(head.cells).forEach((th, col) => {
    th.tabIndex = 0;
    th.classList.add("clickable");
    th.addEventListener("click", () => sortBy(table, col, th));
    th.addEventListener("keydown", (e) => { if (e.key === "Enter") sortBy(table, col, th); });
  });
}

function makeFilter(input) {
  const table = document.getElementById(input.dataset.table);
  if (!table) return;
  input.addEventListener("input", () => {
    const q = input.value.trim().toLowerCase();
    for (const r of table.tBodies[0].rows) r.hidden = q !== "" && !r.textContent.toLowerCase().includes(q);
  });
}

// The clipboard API where the page is a secure context (https, localhost, file:// in Chromium); otherwise the
// older copy command on a hidden text area.
function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  return new Promise((resolve, reject) => {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (ok) resolve(); else reject(new Error("copy refused"));
  });
}

function makeCopy(button) {
  button.addEventListener("click", () => {
    copyText(button.dataset.copy).then(
      () => { button.textContent = "copied"; setTimeout(() => { button.textContent = "copy"; }, 1500); },
      () => {
        // no clipboard access: select the command so that Ctrl-C copies it
        const code = button.parentElement.querySelector("code.command");
        if (code) window.getSelection().selectAllChildren(code);
        button.textContent = "press Ctrl-C";
      });
  });
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("input.filter").forEach(makeFilter);
  document.querySelectorAll("button.copy").forEach(makeCopy);
});
