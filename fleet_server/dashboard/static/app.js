// edge-fleet dashboard: live regions (cheap polling of server-rendered fragments),
// confirmations, auto-submitting selects, and the device charts (plotly.js).
"use strict";

(function () {
  // --- live regions: <div data-live="/live/..." data-every="2000"> --------------------
  function startLive(region) {
    var url = region.getAttribute("data-live");
    var every = Math.max(1000, parseInt(region.getAttribute("data-every") || "3000", 10));
    var last = null;
    var busy = false;

    function tick() {
      if (busy || document.visibilityState !== "visible") return;
      // never swap the controls out from under a user who is using them
      var focus = document.activeElement;
      if (focus && region.contains(focus) && /^(INPUT|SELECT|TEXTAREA)$/.test(focus.tagName)) return;
      busy = true;
      fetch(url, { credentials: "same-origin", cache: "no-store", headers: { Accept: "text/html" } })
        .then(function (res) {
          if (res.status === 401) { window.location.reload(); return null; }
          return res.ok ? res.text() : null;
        })
        .then(function (html) {
          if (html === null) return;
          // compare without the "updated at" stamp, so an unchanged region is left alone
          var key = html.replace(/<time[^>]*>[^<]*<\/time>/g, "");
          if (key !== last) {
            region.innerHTML = html;
            // a "done" notice is stale once the region moved on (e.g. a gate paused it)
            if (last !== null) document.querySelectorAll("[data-flash]").forEach(function (el) { el.remove(); });
            last = key;
          }
          region.setAttribute("data-live-at", String(Date.now()));
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { busy = false; });
    }
    tick();
    window.setInterval(tick, every);
    document.addEventListener("visibilitychange", tick);
  }

  // --- forms ---------------------------------------------------------------------------
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form && form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  });
  document.addEventListener("change", function (ev) {
    var el = ev.target;
    if (el && el.hasAttribute && el.hasAttribute("data-autosubmit") && el.form) {
      el.form.requestSubmit ? el.form.requestSubmit() : el.form.submit();
    }
  });

  // --- charts ----------------------------------------------------------------------------
  var FIXED_RANGES = { cpu: [0, 100] };

  function hasData(series) {
    return series.some(function (s) { return s.y.some(function (v) { return v !== null; }); });
  }

  function drawCharts() {
    var holder = document.getElementById("chart-data");
    if (!holder) return;
    if (!window.Plotly) {
      document.querySelectorAll("[data-chart]").forEach(function (el) {
        el.textContent = "Charts are unavailable: the server has no plotly package.";
      });
      return;
    }
    var data = JSON.parse(holder.textContent);
    data.charts.forEach(function (chart) {
      var el = document.getElementById("chart-" + chart.key);
      if (!el) return;
      var traces = chart.series.map(function (s) {
        return {
          type: "scatter", mode: s.x.length < 40 ? "lines+markers" : "lines", name: s.name, x: s.x, y: s.y,
          connectgaps: false, line: { width: 2 },
          hovertemplate: "%{y} " + chart.unit + "<extra>" + s.name + "</extra>"
        };
      });
      var empty = !hasData(chart.series);
      var layout = {
        margin: { l: 64, r: 12, t: 30, b: 48 },
        font: { family: "system-ui, sans-serif", size: 12, color: "#1b1f24" },
        paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
        showlegend: traces.length > 1,
        legend: { orientation: "h", x: 0, y: 1.02, xanchor: "left", yanchor: "bottom" },
        xaxis: {
          type: "date", title: { text: "Time (UTC)", standoff: 6 }, range: [data.since, data.until],
          automargin: true, gridcolor: "#e6e8eb", nticks: 6, ticks: "outside", ticklen: 5,
          tickcolor: "#c9cdd2"
        },
        yaxis: {
          title: { text: chart.y_title, standoff: 6 }, automargin: true, rangemode: "tozero",
          gridcolor: "#e6e8eb", zeroline: true, zerolinecolor: "#c9cdd2"
        },
        annotations: empty ? [{
          text: "No data in this window", showarrow: false, xref: "paper", yref: "paper",
          x: 0.5, y: 0.5, font: { color: "#5b6470", size: 13 }
        }] : []
      };
      if (FIXED_RANGES[chart.key]) layout.yaxis.range = FIXED_RANGES[chart.key];
      else if (empty) layout.yaxis.range = [0, 1];
      window.Plotly.newPlot(el, traces, layout, { displayModeBar: false, responsive: true });
    });
  }

  function start() {
    document.querySelectorAll("[data-live]").forEach(startLive);
    drawCharts();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
