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

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  document.querySelectorAll("input.filter").forEach(makeFilter);
});
