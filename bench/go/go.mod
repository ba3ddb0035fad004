module github.com/socketforward/socketforward/bench/go

go 1.25.0
