/* The customer dashboard's charts: one uPlot bar chart per meter, drawn from the JSON
   the page embeds (#usage-data).  The same numbers are in the tables below each chart,
   so the page reads the same without JavaScript.  No inline script: the page's
   Content-Security-Policy allows only files from this origin. */
(function () {
  "use strict";

  var source = document.getElementById("usage-data");
  if (!source || typeof uPlot === "undefined") {
    return;
  }
  var data = JSON.parse(source.textContent);

  function options(series, width) {
    var bars = uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.7, 40] }) : undefined;
    return {
      width: width,
      height: 220,
      legend: { show: true },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      series: [
        {},
        {
          label: series.meter + (series.unit ? " (" + series.unit + ")" : ""),
          stroke: "#1f4e79",
          fill: "rgba(31, 78, 121, 0.35)",
          paths: bars,
          points: { show: false },
        },
      ],
      axes: [{}, { size: 60 }],
    };
  }

  function draw(element) {
    var series = data.series[Number(element.getAttribute("data-series"))];
    if (!series) {
      return;
    }
    var values = series.v.map(Number); // decimals as text: a chart needs no more precision
    var width = Math.max(element.clientWidth, 320);
    var plot = new uPlot(options(series, width), [series.t, values], element);
    element.setAttribute("data-drawn", "true");
    return plot;
  }

  var plots = Array.prototype.map.call(document.querySelectorAll(".chart[data-series]"), draw);

  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      plots.forEach(function (plot) {
        if (plot) {
          var width = Math.max(plot.root.parentNode.clientWidth, 320);
          plot.setSize({ width: width, height: 220 });
        }
      });
    }, 150);
  });
})();
