"""Table of (answer, reference, expected) cases for the binary RL reward, organised by kind.

Every expected value is what a grader of a binary RL reward should return: a wrong answer graded right is
reward hacking, so near-miss wrong answers sit next to every right one. `b(...)` adds a case in both
directions (answer and reference swapped); `c(...)` one direction only. A `note` says where the expected
value differs from what math-verify alone returns (`verify(parse(ref), parse(answer))` on the boxed
strings, as of math-verify 0.9) and why.
"""

import time

import pytest

from ovr_hpc.grading import score


def c(answer, reference, expected, note="", answer_type=None):
    return [(answer, reference, expected, answer_type, note)]


def b(answer, reference, expected, note="", answer_type=None):
    return c(answer, reference, expected, note, answer_type) + c(reference, answer, expected, note, answer_type)


MV_SPACED_ROWS = "math-verify alone: right (it reads the spaced row break fine); ours was wrong before the fix"
MV_SUM = "ours before the fix: right (spaced rows read as one number, the entries' sum)"
MV_UNITS = "math-verify alone: right (it drops both units)"
MV_POINTS = "math-verify alone: right (points read as a commutative product of symbols)"
MV_SET_TUPLE = "math-verify alone: right (a pair is compared as a set)"
MV_FALSE_EQ = "math-verify alone: right (keeps the answer equation's right-hand side)"
MV_VECTOR = "math-verify alone: wrong (a tuple is never a matrix)"
MV_WORDS = "math-verify alone: right (words read as products of symbols: any anagram)"
MV_CASE = "math-verify alone: wrong (words compared as symbols: case and hyphens count)"
MV_RELATION = "math-verify alone: wrong in one direction (a relation answer against an interval)"
MV_ALL_BOXES = "math-verify alone: right (it joins all boxes into one set)"
MV_CHOICE = "math-verify alone: wrong (no option spellings)"

MV_CHOICE_SPELLINGS = ("C.", "option C", "Answer: C", "C: 12 cm", "(C) 12 cm")

CASES = {
    "numbers": [
        *b("12", "12", True),
        *b("12", "12.0", True),
        *b("12", "012", True),
        *b("-7", "-7", True),
        *c("+7", "7", True),
        *b("-7", "7", False),
        *b("12", "13", False),
        *b("12", "21", False),
        *b("100", "1000", False),
        *b("0", "0.0", True),
        *c("-0", "0", True),
        *b("1000000", "1000001", False),
        *b("123456789", "123456788", False),
        *b("1e3", "1000", True, "math-verify alone: wrong (reads 1e3 as 1*e*3)"),
        *c("1e3", "100", False),
        *b("3\\times 10^{8}", "300000000", True),
        *b("3\\times 10^{8}", "3\\times 10^{9}", False),
        *b("2^{10}", "1024", True),
        *b("2^{10}", "1023", False),
        *b("10!", "3628800", True),
        *c("10!", "3628801", False),
        *b("\\binom{5}{2}", "10", True),
        *c("\\binom{5}{2}", "11", False),
        *b("\\sqrt{4}", "2", True),
        *c("\\sqrt[3]{8}", "2", True),
        *c("\\sqrt[3]{8}", "3", False),
        *b("2\\sqrt{3}", "\\sqrt{12}", True),
        *b("3\\sqrt{2}", "\\sqrt{12}", False),
        *b("\\sqrt{2}", "2", False),
        *b("\\log_2 8", "3", True),
        *c("\\log_2 8", "4", False),
        *b("2\\pi", "2\\pi", True),
        *b("\\pi", "\\pi^2", False),
        *b("i", "-i", False),
        *b("1+i", "1-i", False),
        *b("\\infty", "-\\infty", False),
        *c("two", "2", True, "math-verify alone: wrong (number words)"),
        *c("\\text{three}", "2", False),
        *c("12", "twelve", True, "math-verify alone: wrong (number words)"),
        *c("x = 12", "12", True),
        *c("12", "x = 12", True),
        *c("x = 13", "12", False),
    ],
    "fractions": [
        *b("\\frac{1}{2}", "0.5", True),
        *b("\\frac{1}{2}", "\\frac{2}{4}", True),
        *b("\\dfrac{1}{2}", "1/2", True),
        *b("\\tfrac12", "\\frac{1}{2}", True),
        *b("\\frac{1}{2}", "\\frac{1}{3}", False),
        *b("\\frac{1}{2}", "2", False),
        *b("\\frac{1}{2}", "-\\frac{1}{2}", False),
        *b("-\\frac{1}{2}", "\\frac{-1}{2}", True),
        *b("\\frac{1}{-2}", "-0.5", True),
        *b("1/2", "2/1", False),
        *b("\\frac{3}{4}", "\\frac{4}{3}", False),
        *b("\\frac{7}{3}", "2\\frac{1}{3}", True),
        *b("2\\frac{1}{2}", "\\frac{5}{2}", True),
        *c("2\\frac{1}{2}", "1", False),
        *c("1\\frac{1}{2}", "\\frac{1}{2}", False),
        *b("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
        *b("\\frac{\\sqrt{3}}{2}", "\\frac{1}{\\sqrt{2}}", False),
        *b("\\frac{10}{4}", "2.5", True),
        *c("0.\\overline{3}", "\\frac{1}{3}", True, "math-verify alone: wrong (no repeating decimals)"),
        *c("0.1\\overline{6}", "\\frac{1}{6}", True, "math-verify alone: wrong (no repeating decimals)"),
        *c("0.\\overline{3}", "\\frac{1}{9}", False),
        *c("0.\\overline{6}", "\\frac{1}{6}", False),
        *b("\\frac{a}{b}", "\\frac{b}{a}", False),
        *b("\\frac{x+1}{2}", "\\frac{x}{2}+\\frac{1}{2}", True),
        *b("\\frac{x+1}{2}", "\\frac{x+2}{2}", False),
    ],
    "decimals": [
        *b("0.5", "0.50", True),
        *b(".5", "0.5", True),
        *c("5.", "5", True, "math-verify alone: wrong (a trailing full stop)"),
        *b("1.5", "1.05", False),
        *b("0.1", "0.01", False),
        *b("3.49", "3.5", False),
        *b("12.5", "12.6", False),
        *b("123.45", "123.46", False),
        *b("0.001", "0.002", False),
        *b("2.0001", "2", False),
        *c("0.333333", "\\frac{1}{3}", True),
        *c("0.3334", "\\frac{1}{3}", False),
        *c("0.33", "\\frac{1}{3}", False),
        *c("3.14", "\\pi", False),
        *c("3.14159", "\\pi", False),
        *c("1.41", "\\sqrt{2}", False),
        *c("11.3137", "11.31", True, "math-verify alone: wrong (a rounded reference matched to its last place)"),
        *c("8\\sqrt{2}", "11.31", True, "math-verify alone: wrong (a rounded reference matched by value)"),
        *c("11.3", "11.31", False),
        *c("11.32", "11.31", False),
        *c("-11.3137", "11.31", False),
        *c("6.28", "2\\pi", False),
        *c("1.04", "1.0", False),
        *b("1000.5", "1,000.5", True),
        *b("\\approx 3.14", "3.14", True, "math-verify alone: wrong (a leading \\approx)"),
        *c("\\approx 3.2", "3.14", False),
        *c("12.0001", "12", True, answer_type="number"),
        *c("12.01", "12", False, answer_type="number"),
        *c("3.1416", "3.14159", True, answer_type="number"),
        *c("3.15", "3.14159", False, answer_type="number"),
        *c("\\frac{1}{3}", "0.33333", True, answer_type="number"),
        *c("0.3", "0.33333", False, answer_type="number"),
    ],
    "units": [
        *b("5", "5\\text{ cm}", True),
        *b("5 cm", "5", True),
        *b("5\\text{ cm}", "5 \\text{cm}", True),
        *b("5\\,\\mathrm{cm}", "5\\text{ cm}", True),
        *b("5 \\text{ centimeters}", "5\\text{ cm}", True),
        *b("5 \\text{ meters}", "5 \\text{ m}", True),
        *b("5\\text{ cm}", "5\\text{ m}", False, MV_UNITS),
        *b("5 cm", "5 m", False, MV_UNITS),
        *b("5 \\text{ hours}", "5 \\text{ minutes}", False, MV_UNITS),
        *b("5 \\text{ kg}", "5 \\text{ g}", False, MV_UNITS),
        *b("5\\text{ cm}^2", "5\\text{ cm}", False, MV_UNITS),
        *b("5 \\text{ square meters}", "5\\text{ m}^2", True),
        *b("5 \\text{ cm}^3", "5 \\text{ cubic centimeters}", True),
        *b("6\\text{ cm}", "5\\text{ cm}", False),
        *b("2\\pi\\text{ cm}", "2\\pi\\text{ m}", False, MV_UNITS),
        *b("2\\pi\\text{ cm}", "2\\pi", True),
        *b("\\frac{1}{2}\\text{ cm}", "0.5\\text{ cm}", True),
        *b("12 \\text{ feet}", "12 \\text{ ft}", True),
        *b("12 \\text{ feet}", "12 \\text{ in}", False, MV_UNITS),
        *b("9.8 m/s^2", "9.8 \\text{ m/s}^2", True, "math-verify alone: wrong (a compound unit)"),
        *b("6", "5\\text{ cm}", False),
        *b("5 \\text{ apples}", "5", True),
        *b("6 \\text{ apples}", "5", False),
        *c("5 dollars", "5", True, "math-verify alone: wrong (plain unit words)"),
        *b("\\$5", "5", True),
        *b("\\$5.00", "5", True),
        *b("\\$5", "\\$6", False),
        *c("5 m/s", "5", True, "math-verify alone: wrong (a compound unit)"),
        *c("5 km/h", "5\\text{ km/h}", True, "math-verify alone: wrong (a compound unit)"),
        *b("5 \\text{ m/s}", "5 \\text{ km/h}", False, MV_UNITS),
        *c("12 square units", "12", True),
        *c("2 pi", "2", False),
        *c("5 thousand", "5", False),
        *c("3 and 4", "3", False),
        *b("30^\\circ", "30", True),
        *c("30°", "30", True, "math-verify alone: wrong (the degree sign)"),
        *b("45 \\text{ degrees}", "45^\\circ", True),
        *b("46 \\text{ degrees}", "45^\\circ", False),
        *b("30^\\circ", "\\frac{\\pi}{6}", True, "math-verify alone: wrong (degrees against radians)"),
        *b("30^\\circ", "\\frac{\\pi}{5}", False),
        *c("30", "\\frac{\\pi}{6}", False),
        *c("0.5236", "30^\\circ", False),
        *b("135^\\circ", "45^\\circ", False),
    ],
    "percentages": [
        *c("50\\%", "0.5", True),
        *c("50\\%", "50", True),
        *c("50", "50\\%", True),
        *c("0.5", "50\\%", True),
        *c("50 percent", "0.5", True),
        *c("5\\%", "0.5", False),
        *c("0.5\\%", "0.5", False),
        *c("0.5", "0.5\\%", False),
        *c("50", "0.5", False),
        *c("25\\%", "0.5", False),
        *c("12\\%", "0.12", True),
        *c("12", "0.12", False),
        *c("0.12", "12", False),
        *c("51\\%", "50\\%", False),
        *b("50\\%", "50 \\%", True),
        *c("0.12", "12\\%", True, answer_type="number"),
        *c("12", "12\\%", True, answer_type="number"),
        *c("13", "12\\%", False, answer_type="number"),
    ],
    "intervals": [
        *b("(1,2]", "(1, 2]", True),
        *b("(1,2]", "[1,2)", False),
        *b("[0,1]", "[0,1)", False),
        *b("(0,1]", "[0,1]", False),
        *b("[0,2]", "[0,1]", False),
        *b("(-\\infty, 3)", "x < 3", True, MV_RELATION),
        *b("(-\\infty, 3]", "x < 3", False),
        *b("x \\le 3", "(-\\infty, 3]", True, MV_RELATION),
        *b("(3, 5)", "3 < x < 5", True, MV_RELATION),
        *b("[3, 5]", "3 < x < 5", False),
        *b("(-\\infty,1)\\cup(2,\\infty)", "(2,\\infty)\\cup(-\\infty,1)", True),
        *b("(-\\infty,1]\\cup(2,\\infty)", "(-\\infty,1)\\cup(2,\\infty)", False),
        *b("(-\\infty,1)\\cup(3,\\infty)", "(-\\infty,1)\\cup(2,\\infty)", False),
        *b("(-\\infty, \\infty)", "\\mathbb{R}", True),
        *b("\\mathbb{R}", "(0, \\infty)", False),
        *b("[0, \\infty)", "(0,\\infty)", False),
        *b("x > 0", "(0,\\infty)", True, MV_RELATION),
        *b("x \\ge 0", "(0,\\infty)", False),
        *b("(0,1) \\cup (1,2)", "(0,2)", False),
        *b("\\left(1, 2\\right]", "(1,2]", True),
        *b("[1, 2]", "\\{1, 2\\}", False),
        *b("x > 3", "x \\geq 3", False),
        *c("(3, \\infty)", "x > 3", True),
        *c("x > 3", "3", False),
    ],
    "sets": [
        *b("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
        *b("\\{1, 2\\}", "\\{1, 2, 3\\}", False),
        *b("\\{1, 3\\}", "\\{1, 2\\}", False),
        *b("1, 2, 3", "\\{1,2,3\\}", True),
        *b("1, 2", "\\{1,2,3\\}", False),
        *b("3, 2, 1", "1, 2, 3", True),
        *b("1, 2, 4", "1, 2, 3", False),
        *b("\\{-1, 1\\}", "\\pm 1", True),
        *b("-1, 1", "\\pm 1", True),
        *b("\\pm 3", "3", False),
        *b("3, 7", "7", False),
        *b("\\{3, 7\\}", "7", False),
        *c("3 \\text{ or } 7", "7", False),
        *c("x = 3 \\text{ or } x = 7", "3", False),
        *c("x = 1 \\text{ or } x = 2", "1, 2", True),
        *c("x = 1 \\text{ or } x = 3", "1, 2", False),
        *b("\\emptyset", "\\varnothing", True, "math-verify alone: wrong (knows only \\emptyset)"),
        *c("∅", "\\emptyset", True),
        *b("\\emptyset", "\\{\\}", True),
        *b("\\emptyset", "0", False),
        *b("\\{1, 2\\}", "(1, 2)", False, MV_SET_TUPLE),
        *b("\\{2, 1\\}", "(1, 2)", False, MV_SET_TUPLE + " in one direction"),
        *b("\\{0\\}", "\\emptyset", False),
        *c("\\{x \\mid x > 3\\}", "\\{x \\mid x > 4\\}", False),
    ],
    "tuples": [
        *b("(1, 2)", "(1,2)", True),
        *b("(1, 2)", "(2, 1)", False),
        *b("(2, -3)", "(2, 3)", False),
        *b("(1, 4, 5)", "(1, 4)", False),
        *b("(\\frac12, 3)", "(0.5, 3)", True),
        *b("\\left( 1, 4 \\right)", "(1,4)", True),
        *b("\\langle 1, 2 \\rangle", "(1, 2)", True, "math-verify alone: parse error (\\langle)"),
        *b("\\langle 2, 1 \\rangle", "(1, 2)", False),
        *c("1, 2", "(1,2)", True),
        *c("2, 1", "(1,2)", False),
        *c("x=1, y=2", "(1,2)", True),
        *c("x=2, y=1", "(1,2)", False),
        *c("(x, y) = (1, 2)", "(1, 2)", True),
        *c("(x, y) = (2, 1)", "(1, 2)", False),
        *b("a=3, b=7", "b=7, a=3", True),
        *b("a=3, b=7", "a=3, b=8", False),
        *b("(1, 2, 3)", "(1, 2, 3)", True),
        *b("(1, 2, 3)", "(1, 3, 2)", False),
    ],
    "vectors_matrices": [
        *b("\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix}1\\\\4\\end{pmatrix}", True, MV_SPACED_ROWS),
        *b("\\begin{pmatrix} 4 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False, MV_SUM),
        *b("\\begin{pmatrix} 0 \\\\ 5 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 3 \\end{pmatrix}", False, MV_SUM),
        *b("\\begin{pmatrix} 3 \\\\ 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", False,
           MV_SUM),
        *b("\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", True),
        *b("\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", False),
        *b("\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ - 2 \\end{pmatrix}", True),
        *b("\\begin{bmatrix} 1 \\\\ 4 \\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", True),
        *b("\\begin{pmatrix} 1/2 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{2} \\\\ 4 \\end{pmatrix}", True),
        *b("\\begin{pmatrix} 0.5 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{2} \\\\ 4 \\end{pmatrix}", True),
        *b("\\begin{pmatrix} 5 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False, MV_SUM),
        *b("5", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False),
        *b("14", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False),
        *b("(1, 4)", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", True, MV_VECTOR),
        *b("(4, 1)", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False),
        *b("(1,2,3)", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", True, MV_VECTOR),
        *b("(1,2)", "\\begin{pmatrix} 1 \\\\ 2 \\\\ 3 \\end{pmatrix}", False),
        *b("\\langle 1, 4 \\rangle", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", True, MV_VECTOR),
        *b("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True,
           MV_SPACED_ROWS),
        *b("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 3 \\\\ 2 & 4 \\end{pmatrix}", False,
           MV_SUM),
        *b("\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
        *b("\\begin{pmatrix} 2 & 0 \\\\ 0 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 & 1 \\\\ 1 & 1 \\end{pmatrix}", False,
           MV_SUM),
        *b("\\begin{pmatrix} 1 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 4 \\end{pmatrix}", False),
        *b("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", True,
           MV_SPACED_ROWS),
        *b("\\begin{pmatrix} 0 & 1 \\\\ 1 & 0 \\end{pmatrix}", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", False,
           MV_SUM),
        *b("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\\\ 5 & 6 \\end{pmatrix}",
           "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\\\ 5 & 7 \\end{pmatrix}", False),
    ],
    "equations": [
        *b("y = 2x + 1", "y = 1 + 2x", True),
        *b("y = 2x + 1", "y = 2x + 2", False),
        *b("y=2x", "y=2x+1", False),
        *c("y = 2x + 1", "2x + 1", True),
        *c("2x+1", "y = 2x+1", True),
        *b("x + y = 1", "y = 1 - x", True),
        *b("2x + 2y = 2", "x + y = 1", True),
        *b("x = 2", "y = 2", False, "ours before the fix: right (its plain-number second look dropped the names)"),
        *b("x=5", "x=6", False),
        *b("x^2 = 4", "x = 2", False),
        *c("k=5", "5", True),
        *c("5 = 5", "5", True),
        *c("3 + 4 = 7", "7", True),
        *c("3 = 7", "7", False, MV_FALSE_EQ),
        *c("7 = 3", "3", False, MV_FALSE_EQ),
        *c("x = 3 = 7", "7", False, MV_FALSE_EQ),
        *c("3 = 7", "7", False, MV_FALSE_EQ, answer_type="number"),
        *c("1 = 1", "7", False),
        *c("f(3) = 7", "7", True),
        *b("\\theta = \\frac{\\pi}{2}", "\\alpha = \\frac{\\pi}{2}", False),
        *b("x_1 = 3", "x_2 = 3", False),
        *b("x = 2 \\text{ or } x = 3", "x = 3 \\text{ or } x = 2", True),
        *b("x^2 - 5x + 6 = 0", "(x-2)(x-3) = 0", True),
        *b("x^2 - 5x + 6 = 0", "(x-2)(x-4) = 0", False),
    ],
    "text": [
        *b("\\text{Paris}", "Paris", True),
        *b("\\text{paris}", "Paris", True),
        *b("\\text{London}", "Paris", False),
        *c("\\text{Paris, France}", "Paris", False),
        *c("\\text{not Paris}", "Paris", False),
        *c("\\text{Paris or London}", "Paris", False),
        *b("\\text{yes}", "\\text{no}", False),
        *b("\\text{Yes}", "yes", True),
        *b("True", "False", False),
        *b("true", "True", True, MV_CASE),
        *b("\\text{increasing}", "\\text{decreasing}", False),
        *b("\\text{clockwise}", "\\text{counterclockwise}", False),
        *b("\\text{counter-clockwise}", "\\text{counterclockwise}", True, MV_CASE),
        *b("north-east", "north east", True, MV_CASE),
        *b("\\text{Saturday}", "\\text{Sunday}", False),
        *b("\\text{hyperbola}", "\\text{parabola}", False),
        *b("\\text{odd}", "\\text{Odd}", True),
        *b("\\text{odd}", "\\text{even}", False),
        *b("\\text{neither}", "\\text{even}", False),
        *b("\\text{no solution}", "\\text{No solution}", True),
        *b("\\text{infinitely many}", "\\text{no solution}", False),
        *b("act", "cat", False, MV_WORDS),
        *b("listen", "silent", False, MV_WORDS),
        *b("dog", "God", False, MV_WORDS),
        *b("mitochondrion", "mitochondria", False),
        *b("Democrats", "democrats", True, MV_CASE),
        *b("\\text{united states}", "United States", True),
        *b("\\text{Alice}", "\\text{Bob}", False),
        *b("AB", "BA", True),
        *b("\\overline{AB}", "AB", True, "math-verify alone: wrong (\\overline is not a segment name)"),
        *b("\\overline{AB}", "AC", False),
        *b("ABC", "ACB", False, MV_POINTS),
        *b("ABC", "CBA", True),
        *b("\\angle ABC", "\\angle CBA", True),
        *b("\\angle ABC", "\\angle BAC", False, MV_POINTS),
        *b("\\triangle ABC", "\\triangle BCA", True),
        *b("\\triangle ABC", "\\triangle ABD", False),
        *b("ABCD", "ABDC", False, MV_POINTS),
        *b("H_2O", "H_2O_2", False),
        *b("CO_2", "CO", False),
    ],
    "choices": [
        *[x for a in ["C", "(C)", "C.", "[C]", "c", "option C", "Answer: C", "\\text{C}", "\\textbf{(C)}", "C: 12 cm",
                      "(C) 12 cm"] for x in c(a, "C", True, MV_CHOICE if a in MV_CHOICE_SPELLINGS else "")],
        *[x for a in ["B", "(B)", "b", "option B", "A, C", "C, A", "AC", "CD", "ABCD", "A B C D", "C or D",
                      "\\text{C or D}", "C and D", "(C) or (D)", "C, D", "C/D", "all of the above", "12"]
          for x in c(a, "C", False)],
        *c("\\text{(A) and (C)}", "(A)", False, "ours before the fix: right (the second letter was option text)"),
        *c("C", "(C)", True, answer_type="multiple_choice"),
        *c("D", "(C)", False, answer_type="multiple_choice"),
        *c("C or D", "C", False, answer_type="multiple_choice"),
        *c("B", "B. 12 cm", True, answer_type="multiple_choice"),
        *c("C", "B. 12 cm", False, answer_type="multiple_choice"),
        *c("A, C", "A, C", True, answer_type="multiple_choice"),
        *c("C,A", "AC", True, answer_type="multiple_choice"),
        *c("A", "AC", False, answer_type="multiple_choice"),
        *c("A, B, C", "AC", False, answer_type="multiple_choice"),
        *c("12", "12", True, answer_type="multiple_choice"),
        *c("13", "12", False, answer_type="multiple_choice"),
        *c("option C", "C", False, answer_type="math"),
        *c("C", "C", True, answer_type="math"),
    ],
    "latex_spacing_separators": [
        *b("14,\\!916", "14916", True, "ours before the fix: wrong (a set of 14 and 916)"),
        *b("14,\\!916", "14,916", True),
        *b("14,\\!916", "14,\\!917", False),
        *b("14,\\!916", "14916.5", False),
        *b("\\$16,\\!386.20", "16386.2", True, "ours before the fix: wrong (a set of two numbers)"),
        *b("\\$16,\\!386.20", "16386.02", False),
        *b("1,\\!000,\\!000", "1000000", True),
        *b("1,\\!000,\\!001", "1000000", False),
        *b("2,\\!500", "2500", True),
        *b("25,\\!00", "2500", False),
        *b("1,000", "1000", True),
        *b("10,000", "10000", True),
        *c("10,00", "1000", False),
        *b("1{,}000", "1000", True),
        *b("1\\,000", "1000", True, "math-verify alone: wrong (a thin space)"),
        *b("14\\,916", "13664", False),
        *b("1,5", "15", False),
        *b("1,5", "1.5", False),
        *b("\\frac{1}{2}", "\\frac {1} {2}", True),
        *b("\\dfrac{1}{2}", "\\displaystyle\\frac{1}{2}", True),
        *b("x^{2}", "x^2", True),
        *b("x^{2}", "x^3", False),
        *b("2 \\cdot 3", "6", True),
        *b("2\\;\\text{cm}", "2\\text{ cm}", True),
        *b("\\left[ 0, 1 \\right)", "[0,1)", True),
        *b("\\left[ 0, 1 \\right)", "[0,1]", False),
        *b("5~\\text{cm}", "5\\text{ cm}", True, "math-verify alone: wrong (a ~ space)"),
        *b("5\\quad\\text{cm}", "5", True),
        *b("−1", "-1", True),
        *b("−1", "1", False),
        *b("2√3", "2\\sqrt{3}", True, "math-verify alone: wrong (the Unicode root)"),
        *b("2√3", "3\\sqrt{2}", False),
        *c("5", "5\\", True, "ours before the fix: wrong (the trailing backslash escaped the wrapper's brace)"),
        *c("6", "5\\", False),
        *c("12", "\\boxed{12}", True),
        *c("12", "$12$", True),
        *c("12", "\\boxed{12\\\\}", True, "math-verify alone: wrong (a row break at the end)"),
        *c("3", "\\boxed{3} apples and \\boxed{7} pears", False,
           "a partial answer; ours before the fix: right (only the last box was kept)"),
        *c("7", "\\boxed{3} apples and \\boxed{7} pears", False,
           "a partial answer; ours before the fix: right (only the last box was kept)"),
        *c("3, 7", "\\boxed{3} apples and \\boxed{7} pears", True),
        *c("(3, 7)", "\\boxed{3} apples and \\boxed{7} pears", True),
        *c("7, 3", "\\boxed{3} apples and \\boxed{7} pears", False, MV_ALL_BOXES),
        *c("3, 7, 9", "\\boxed{3} apples and \\boxed{7} pears", False),
        *c("\\{3, 7\\}", "\\boxed{3} apples and \\boxed{7} pears", False, MV_ALL_BOXES),
        *c("5", "\\boxed{5}. So the answer is \\boxed{5}", True),
    ],
}

# Responses that box several answers (the reference with several parts wants them in order).
MULTI_BOX = [
    ("\\boxed{3} apples and \\boxed{7} pears", "\\boxed{3} and \\boxed{7}", True),
    ("\\boxed{3} apples and \\boxed{7} pears", "\\boxed{7} and \\boxed{3}", False),
    ("\\boxed{3} apples and \\boxed{7} pears", "first \\boxed{1}, then \\boxed{3} and \\boxed{7}", True),
    ("\\boxed{3} apples and \\boxed{7} pears", "\\boxed{3} and \\boxed{8}", False),
    ("\\boxed{x=1}, \\boxed{y=2}", "\\boxed{x=1} \\boxed{y=2}", True),
    ("\\boxed{x=1}, \\boxed{y=2}", "\\boxed{x=1} \\boxed{y=3}", False),
    ("\\boxed{14,\\!916} and \\boxed{2}", "\\boxed{14,916, 2}", True),
    ("\\boxed{14,\\!916} and \\boxed{2}", "\\boxed{14916}", False),
    ("7", "\\boxed{3} or maybe \\boxed{7}", True),  # the last box is the answer
    ("3", "\\boxed{3} or maybe \\boxed{7}", False),
]

TABLE = [(kind, *case) for kind, cases in CASES.items() for case in cases]


@pytest.fixture(scope="module", autouse=True)
def warm():
    score("\\boxed{1}", "1")  # sympy / math-verify imports are not a case's time


def test_table_is_large_and_has_near_misses():
    assert len(TABLE) >= 400
    for kind, cases in CASES.items():
        expected = {case[2] for case in cases}
        assert expected == {True, False}, kind  # every kind has right answers and near-miss wrong ones


@pytest.mark.parametrize("kind,answer,reference,expected,answer_type,note", TABLE,
                         ids=[f"{t[0]}:{t[1]}|{t[2]}" for t in TABLE])
def test_reward_table(kind, answer, reference, expected, answer_type, note):
    start = time.process_time()  # the grader's own CPU time: other jobs on the machine do not count
    res = score("The answer is $\\boxed{" + answer + "}$.", reference, answer_type=answer_type)
    elapsed = time.process_time() - start
    assert res.correct is expected, (answer, reference, res, note)
    assert res.score == (1.0 if expected else 0.0)
    assert elapsed < 1.0, (answer, reference, elapsed)


@pytest.mark.parametrize("reference,response,expected", MULTI_BOX)
def test_several_boxes(reference, response, expected):
    assert score(response, reference).correct is expected


def test_never_evaluates_text_as_code(monkeypatch):
    # sympy evaluates strings only through parse_expr -> eval_expr (sympify of a string goes there too).
    # The one path grading takes there is math-verify's LaTeX parser turning a token its grammar lexed as a
    # number into sympy.Number("12.5") (and sympy's own imports declaring unit symbols): only number
    # literals and plain names ever reach eval, never the text of an answer or a reference.
    import re

    import sympy.parsing.sympy_parser as sympy_parser

    calls = []
    real = sympy_parser.eval_expr
    monkeypatch.setattr(sympy_parser, "eval_expr", lambda code, *a: calls.append(code) or real(code, *a))
    payloads = ["__import__('os').system('true')", "eval('1+1')", "lambda: 2", "exec('x=1')", "x.__class__",
                "(1).__class__.__bases__", "open('/etc/passwd').read()"]
    for payload in payloads:
        for ref in ("2", payload, "\\boxed{2} and \\boxed{3}"):
            score("\\boxed{" + payload + "}", ref)
            score("\\boxed{" + payload + "}", ref, answer_type="number")
    for _kind, answer, reference, _expected, answer_type, _note in TABLE:
        score("\\boxed{" + answer + "}", reference, answer_type=answer_type)
    literal = re.compile(r"^(?:Integer \(\d+ \)|Float \('[\d.eE+-]+' \)|Symbol \('\w+' \))$")
    assert calls and all(literal.match(code) for code in calls), [c for c in calls if not literal.match(c)]
