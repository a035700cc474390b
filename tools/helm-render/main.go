// helm-render renders a Helm chart the way `helm template` does, for charts that need no
// dependencies, no .Files and no cluster lookups: Chart.yaml and values.yaml are loaded, -f values
// files and --set / --set-string overrides are coalesced over the defaults, and every template
// under templates/ is executed with Go text/template, the sprig functions and Helm's own functions
// (include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup). The result is one
// multi-document YAML stream on stdout, each document headed by its "# Source:" comment.
//
// Built offline from the Debian Go packages (see tests/deploy/CMakeLists.txt):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm-render tools/helm-render/main.go
//
// Usage: helm-render [--release-name NAME] [--namespace NS] [--kube-version v1.22.0] [--strict]
//
//	[-f values.yaml]... [--set k=v]... [--set-string k=v]... CHART_DIR
//
// A template error exits 1 with the file, line and action that failed.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"sigs.k8s.io/yaml"
)

// Chart is .Chart: Chart.yaml's fields under Helm's capitalised names.
type Chart struct {
	APIVersion   string            `json:"apiVersion"`
	Name         string            `json:"name"`
	Version      string            `json:"version"`
	KubeVersion  string            `json:"kubeVersion"`
	Description  string            `json:"description"`
	Type         string            `json:"type"`
	Keywords     []string          `json:"keywords"`
	Home         string            `json:"home"`
	Sources      []string          `json:"sources"`
	Icon         string            `json:"icon"`
	AppVersion   string            `json:"appVersion"`
	Deprecated   bool              `json:"deprecated"`
	Annotations  map[string]string `json:"annotations"`
	Dependencies []interface{}     `json:"dependencies"`
}

// Release is .Release as `helm template` sets it (a first install).
type Release struct {
	Name      string
	Namespace string
	IsUpgrade bool
	IsInstall bool
	Revision  int
	Service   string
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has reports whether an API version ("apps/v1") or resource ("apps/v1/Deployment") is known.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
	HelmVersion map[string]string
}

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func die(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, "helm-render: "+format+"\n", a...)
	os.Exit(1)
}

func main() {
	opts, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "helm-render:", err)
		fmt.Fprintln(os.Stderr, "usage: helm-render [--release-name NAME] [--namespace NS] [--kube-version vX.Y.Z] "+
			"[--strict] [-f values.yaml]... [--set k=v]... [--set-string k=v]... CHART_DIR")
		os.Exit(2)
	}
	out, err := render(opts)
	if err != nil {
		die("%v", err)
	}
	os.Stdout.WriteString(out)
}

type options struct {
	chartDir, releaseName, namespace, kubeVersion string
	strict                                        bool
	valueFiles, sets, setStrings                  stringList
}

func parseArgs(args []string) (*options, error) {
	o := &options{releaseName: "release-name", namespace: "default", kubeVersion: "v1.22.0"}
	for i := 0; i < len(args); i++ {
		a := args[i]
		name, value, hasValue := a, "", false
		if strings.HasPrefix(a, "--") {
			if eq := strings.Index(a, "="); eq >= 0 {
				name, value, hasValue = a[:eq], a[eq+1:], true
			}
		}
		next := func() (string, error) {
			if hasValue {
				return value, nil
			}
			if i+1 >= len(args) {
				return "", fmt.Errorf("%s needs a value", name)
			}
			i++
			return args[i], nil
		}
		var err error
		switch name {
		case "--release-name", "--name":
			o.releaseName, err = next()
		case "--namespace", "-n":
			o.namespace, err = next()
		case "--kube-version":
			o.kubeVersion, err = next()
		case "--strict":
			o.strict = true
		case "-f", "--values":
			var v string
			v, err = next()
			o.valueFiles = append(o.valueFiles, v)
		case "--set":
			var v string
			v, err = next()
			o.sets = append(o.sets, v)
		case "--set-string":
			var v string
			v, err = next()
			o.setStrings = append(o.setStrings, v)
		default:
			if strings.HasPrefix(a, "-") {
				return nil, fmt.Errorf("unknown flag %s", a)
			}
			if o.chartDir != "" {
				return nil, fmt.Errorf("one chart directory expected, got %s and %s", o.chartDir, a)
			}
			o.chartDir = a
		}
		if err != nil {
			return nil, err
		}
	}
	if o.chartDir == "" {
		return nil, errors.New("no chart directory")
	}
	return o, nil
}

// readYAMLMap reads a YAML mapping the way Helm does (sigs.k8s.io/yaml: numbers become float64).
func readYAMLMap(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	m := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if m == nil {
		m = map[string]interface{}{}
	}
	return m, nil
}

// coalesce merges src over dst as Helm coalesces user values over chart defaults: maps merge key
// by key, anything else replaces, and a null removes the key.
func coalesce(dst, src map[string]interface{}) map[string]interface{} {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		sm, sIsMap := v.(map[string]interface{})
		dm, dIsMap := dst[k].(map[string]interface{})
		if sIsMap && dIsMap {
			dst[k] = coalesce(dm, sm)
		} else {
			dst[k] = v
		}
	}
	return dst
}

func render(o *options) (string, error) {
	var chart Chart
	chartYAML, err := os.ReadFile(filepath.Join(o.chartDir, "Chart.yaml"))
	if err != nil {
		return "", err
	}
	if err := yaml.Unmarshal(chartYAML, &chart); err != nil {
		return "", fmt.Errorf("Chart.yaml: %v", err)
	}
	if chart.Name == "" || chart.Version == "" {
		return "", errors.New("Chart.yaml: name and version are required")
	}
	values, err := readYAMLMap(filepath.Join(o.chartDir, "values.yaml"))
	if err != nil {
		return "", err
	}
	for _, f := range o.valueFiles {
		extra, err := readYAMLMap(f)
		if err != nil {
			return "", err
		}
		values = coalesce(values, extra)
	}
	for _, s := range o.sets {
		if err := applySet(values, s, false); err != nil {
			return "", fmt.Errorf("--set %s: %v", s, err)
		}
	}
	for _, s := range o.setStrings {
		if err := applySet(values, s, true); err != nil {
			return "", fmt.Errorf("--set-string %s: %v", s, err)
		}
	}
	kv := KubeVersion{Version: o.kubeVersion, GitVersion: o.kubeVersion}
	if m := regexp.MustCompile(`^v(\d+)\.(\d+)`).FindStringSubmatch(o.kubeVersion); m != nil {
		kv.Major, kv.Minor = m[1], m[2]
	} else {
		return "", fmt.Errorf("--kube-version %q: expected vMAJOR.MINOR.PATCH", o.kubeVersion)
	}
	top := map[string]interface{}{
		"Values":  values,
		"Release": Release{Name: o.releaseName, Namespace: o.namespace, IsInstall: true, Revision: 1, Service: "Helm"},
		"Chart":   chart,
		"Capabilities": Capabilities{KubeVersion: kv, HelmVersion: map[string]string{"version": "v3"},
			APIVersions: VersionSet{"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1",
				"autoscaling/v2", "rbac.authorization.k8s.io/v1"}},
		"Files": map[string]interface{}{},
	}
	return execute(o, chart, top)
}

// funcMap is sprig's plus Helm's own; include and tpl close over the template set.
func funcMap(t **template.Template, strict bool) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env") // Helm removes these: a chart must not read the renderer's environment
	delete(f, "expandenv")
	includeDepth := map[string]int{}
	f["include"] = func(name string, data interface{}) (string, error) {
		if includeDepth[name] > 1000 {
			return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
		}
		includeDepth[name]++
		defer func() { includeDepth[name]-- }()
		var buf bytes.Buffer
		if err := (*t).ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		clone, err := (*t).Clone()
		if err != nil {
			return "", err
		}
		if strict {
			clone.Option("missingkey=error")
		} else {
			clone.Option("missingkey=zero")
		}
		parsed, err := clone.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("cannot parse template %q: %v", text, err)
		}
		var buf bytes.Buffer
		if err := parsed.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("error during tpl function execution for %q: %v", text, err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	f["toYaml"] = func(v interface{}) string {
		data, err := yaml.Marshal(v)
		if err != nil {
			return "" // Helm swallows the error the same way
		}
		return strings.TrimSuffix(string(data), "\n")
	}
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["toJson"] = func(v interface{}) string {
		data, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(data)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	// `helm template` has no cluster: lookup finds nothing.
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	return f
}

func execute(o *options, chart Chart, top map[string]interface{}) (string, error) {
	tplDir := filepath.Join(o.chartDir, "templates")
	var files []string
	err := filepath.Walk(tplDir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !info.IsDir() && (strings.HasSuffix(p, ".yaml") || strings.HasSuffix(p, ".yml") ||
			strings.HasSuffix(p, ".tpl") || strings.HasSuffix(p, ".txt")) {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	sort.Strings(files)
	var t *template.Template
	t = template.New("gotpl")
	if o.strict {
		t.Option("missingkey=error")
	} else {
		t.Option("missingkey=zero")
	}
	t.Funcs(funcMap(&t, o.strict))
	names := make([]string, 0, len(files))
	for _, p := range files {
		rel, _ := filepath.Rel(o.chartDir, p)
		name := filepath.ToSlash(filepath.Join(chart.Name, rel)) // e.g. specontext/templates/service.yaml
		text, err := os.ReadFile(p)
		if err != nil {
			return "", err
		}
		if _, err := t.New(name).Parse(string(text)); err != nil {
			return "", fmt.Errorf("parse error: %v", err)
		}
		names = append(names, name)
	}
	type document struct{ source, text, kind string }
	var docs []document
	for _, name := range names {
		base := filepath.Base(name)
		if strings.HasPrefix(base, "_") || strings.HasSuffix(base, ".txt") { // partials and NOTES.txt
			continue
		}
		scope := make(map[string]interface{}, len(top)+1)
		for k, v := range top {
			scope[k] = v
		}
		scope["Template"] = map[string]string{"Name": name,
			"BasePath": filepath.ToSlash(filepath.Join(chart.Name, "templates"))}
		var buf bytes.Buffer
		if err := t.ExecuteTemplate(&buf, name, scope); err != nil {
			return "", fmt.Errorf("template error: %v", err)
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		// Helm splits a file into its documents; each gets its own Source header.
		for _, doc := range splitDocuments(text) {
			kind := ""
			if m := kindLine.FindStringSubmatch(doc); m != nil {
				kind = m[1]
			}
			docs = append(docs, document{name, strings.TrimRight(doc, "\n"), kind})
		}
	}
	// Helm prints (and installs) objects by kind in its install order, unknown kinds last.
	sort.SliceStable(docs, func(i, j int) bool { return kindRank(docs[i].kind) < kindRank(docs[j].kind) })
	var out strings.Builder
	for _, d := range docs {
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", d.source, d.text)
	}
	return out.String(), nil
}

var kindLine = regexp.MustCompile(`(?m)^kind:\s*"?([A-Za-z]+)"?\s*$`)

// installOrder is the head of Helm's releaseutil.InstallOrder.
var installOrder = []string{"Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
	"PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass", "PersistentVolume",
	"PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
	"ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service", "DaemonSet", "Pod",
	"ReplicationController", "ReplicaSet", "Deployment", "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob",
	"IngressClass", "Ingress", "APIService"}

func kindRank(kind string) int {
	for i, k := range installOrder {
		if k == kind {
			return i
		}
	}
	return len(installOrder)
}

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*(#.*)?$`)

func splitDocuments(text string) []string {
	var docs []string
	for _, d := range docSeparator.Split(text, -1) {
		if strings.TrimSpace(d) != "" {
			docs = append(docs, strings.TrimLeft(d, "\n"))
		}
	}
	return docs
}

// applySet applies one --set line ("a.b=1,c[0]=x,d=null") as Helm's strvals parser does for the
// common forms: dotted keys (a "\." escapes a dot, as in nvidia\.com/gpu), [N] list indices,
// {a,b} lists, and typed scalars (integers, true/false, null) unless asString.
func applySet(values map[string]interface{}, line string, asString bool) error {
	for _, assignment := range splitUnescaped(line, ',', true) {
		eq := indexUnescaped(assignment, '=')
		if eq < 0 {
			return fmt.Errorf("key %q has no value", assignment)
		}
		key, raw := assignment[:eq], assignment[eq+1:]
		var value interface{}
		if strings.HasPrefix(raw, "{") && strings.HasSuffix(raw, "}") {
			var list []interface{}
			for _, item := range splitUnescaped(raw[1:len(raw)-1], ',', false) {
				list = append(list, typedScalar(unescape(item), asString))
			}
			value = list
		} else {
			value = typedScalar(unescape(raw), asString)
		}
		if err := setPath(values, splitUnescaped(key, '.', false), value); err != nil {
			return err
		}
	}
	return nil
}

func typedScalar(s string, asString bool) interface{} {
	if asString {
		return s
	}
	switch s {
	case "true":
		return true
	case "false":
		return false
	case "null":
		return nil
	}
	// Helm keeps "0123" a string and turns other integers into int64.
	if i, err := strconv.ParseInt(s, 10, 64); err == nil && (s == "0" || !strings.HasPrefix(s, "0")) {
		return i
	}
	return s
}

var indexSuffix = regexp.MustCompile(`^(.*)\[(\d+)\]$`)

func setPath(m map[string]interface{}, path []string, value interface{}) error {
	key := unescape(path[0])
	if ix := indexSuffix.FindStringSubmatch(key); ix != nil {
		n, _ := strconv.Atoi(ix[2])
		list, _ := m[ix[1]].([]interface{})
		for len(list) <= n {
			list = append(list, nil)
		}
		if len(path) == 1 {
			list[n] = value
		} else {
			child, ok := list[n].(map[string]interface{})
			if !ok {
				child = map[string]interface{}{}
			}
			if err := setPath(child, path[1:], value); err != nil {
				return err
			}
			list[n] = child
		}
		m[ix[1]] = list
		return nil
	}
	if len(path) == 1 {
		if value == nil {
			delete(m, key)
		} else {
			m[key] = value
		}
		return nil
	}
	child, ok := m[key].(map[string]interface{})
	if !ok {
		child = map[string]interface{}{}
		m[key] = child
	}
	return setPath(child, path[1:], value)
}

// splitUnescaped splits at sep where it is not preceded by a backslash (and, with braces, not
// inside {...}); the backslashes stay for unescape.
func splitUnescaped(s string, sep byte, braces bool) []string {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\':
			i++
		case braces && s[i] == '{':
			depth++
		case braces && s[i] == '}':
			depth--
		case s[i] == sep && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

func indexUnescaped(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' {
			i++
		} else if s[i] == c {
			return i
		}
	}
	return -1
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
